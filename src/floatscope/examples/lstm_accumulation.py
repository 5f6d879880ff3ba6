"""The LSTM rounding-error experiment, made into a measurement.

A hand-written LSTM cell (input, forget and output gates, candidate state) runs over a sequence.
floatscope runs it in float32, bfloat16 and float16 and measures the hidden state's error against
a float64 reference at every time step: the accumulation curve, with its fitted growth.

Two weight scales are compared: small weights (uniform in [0, 0.01), a contracting recurrence that
forgets its rounding errors) and larger recurrent weights (a recurrence that carries them along).

    python -m floatscope.examples.lstm_accumulation
    floatscope precision src/floatscope/examples/lstm_accumulation.py:make --dtype bfloat16
"""

from __future__ import annotations

import torch


class SeedLSTMCell(torch.nn.Module):
    """One LSTM step: four gates from W_x x + W_h h + b."""

    def __init__(self, input_size: int, hidden_size: int, scale: float) -> None:
        super().__init__()
        self.w_x = torch.nn.Parameter(torch.rand(4, hidden_size, input_size) * 0.01)
        self.w_h = torch.nn.Parameter(torch.randn(4, hidden_size, hidden_size) * scale / hidden_size**0.5)
        self.b = torch.nn.Parameter(torch.zeros(4, hidden_size))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state  # (B, H) each
        gates = torch.einsum("ghi,bi->bgh", self.w_x, x) + torch.einsum("ghk,bk->bgh", self.w_h, h) + self.b  # (B, 4, H)
        i, f, o = torch.sigmoid(gates[:, 0]), torch.sigmoid(gates[:, 1]), torch.sigmoid(gates[:, 2])
        candidate = torch.tanh(gates[:, 3])
        c = f * c + i * candidate
        h = o * torch.tanh(c)
        return h, c


class SeedLSTM(torch.nn.Module):
    def __init__(self, input_size: int = 5, hidden_size: int = 32, scale: float = 0.01) -> None:
        super().__init__()
        self.cell = SeedLSTMCell(input_size, hidden_size, scale)
        self.hidden_size = hidden_size

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = c = inputs.new_zeros(inputs.shape[0], self.hidden_size)  # (B, H)
        states = []
        for t in range(inputs.shape[1]):
            h, c = self.cell(inputs[:, t], (h, c))
            states.append(h)
        return torch.stack(states, dim=1)  # (B, T, H)


def make(scale: float = 3.0, steps: int = 100) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Factory for ``floatscope precision``: the LSTM and a batch of sequences."""
    torch.manual_seed(42)
    model = SeedLSTM(scale=scale)
    inputs = torch.rand(8, steps, 5)  # (B, T, F)
    return model, (inputs,)


def make_seed_scale() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """The original experiment's small weights (uniform in [0, 0.01))."""
    return make(scale=0.01)


def curves(scale: float, steps: int = 100) -> dict[str, list[float]]:
    """Hidden-state error per time step against float64, for float32, bfloat16 and float16."""
    from floatscope.precision import analyze

    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        model, inputs = make(scale=scale, steps=steps)
        result = analyze(model, inputs, dtype=dtype, search=False)
        acc = result.accumulation
        assert acc is not None and acc.module == "cell"
        out[dtype] = acc.error
        out[dtype + ":fit"] = [acc.growth_per_step, 1.0 if acc.model == "exponential" else 0.0]
    return out


def main() -> None:
    for scale, label in ((0.01, "small weights (the original experiment)"), (3.0, "recurrent weights of scale 3")):
        print(f"\n{label}: hidden-state relative error against float64")
        result = curves(scale)
        marks = [0, 9, 24, 49, 74, 99]
        print(f"{'dtype':<10}" + "".join(f"{'t=' + str(t + 1):>11}" for t in marks) + "   growth")
        for dtype in ("float32", "bfloat16", "float16"):
            errors = result[dtype]
            growth, exponential = result[dtype + ":fit"]
            fit = f"x{growth:.4f}/step" if exponential else f"{growth:+.2e}/step"
            print(f"{dtype:<10}" + "".join(f"{errors[t]:>11.2e}" for t in marks) + f"   {fit}")


if __name__ == "__main__":
    main()
