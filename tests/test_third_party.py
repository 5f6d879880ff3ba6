"""A widely used third-party model, built from a config (no download), made to overflow in fp16."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

import floatscope
from floatscope import NonFiniteError

transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).half()


def _gelu_pow_line() -> tuple[str, int]:
    source, start = inspect.getsourcelines(transformers.activations.NewGELUActivation.forward)
    offset = next(i for i, text in enumerate(source) if "torch.pow(input, 3.0)" in text)
    return inspect.getsourcefile(transformers.activations.NewGELUActivation), start + offset


def test_gpt2_fp16_overflow_is_found_in_the_gelu_with_padding_masks_not_blamed():
    torch.manual_seed(0)
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, store=None):
            for step in range(4):
                ids = torch.randint(0, 128, (2, 16))
                mask = torch.ones(2, 16, dtype=torch.long)
                mask[1, 10:] = 0  # padding: finfo.min / -inf mask values are intentional
                if step == 2:
                    with torch.no_grad():
                        model.transformer.h[1].mlp.c_fc.weight.mul_(3000.0)
                out = model(input_ids=ids, attention_mask=mask, labels=ids)  # ModelOutput: loss inside
                opt.zero_grad()
                out.loss.backward()
                opt.step()
    incident = info.value.incident
    assert (incident.op, incident.phase, incident.step) == ("aten.pow.Tensor_Scalar", "forward", 2)
    assert incident.module == "transformer.h.1.mlp.act"
    assert (incident.file, incident.line) == _gelu_pow_line()
    assert incident.category == "overflow" and incident.output.dtype == "float16"


def test_gpt2_under_floatscope_run_captures_keyword_arguments(tmp_path):
    from floatscope._cli.run import run_script

    script = tmp_path / "train_gpt2.py"
    script.write_text(textwrap.dedent("""
        import torch
        import transformers
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(config).half()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-4)
        for step in range(3):
            ids = torch.randint(0, 128, (2, 16))
            if step == 1:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight.mul_(3000.0)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    """))
    code, result = run_script(script, [], store=None)
    assert code == 3
    incident = result.incident
    assert (incident.op, incident.phase, incident.step) == ("aten.pow.Tensor_Scalar", "forward", 1)
    assert incident.module == "transformer.h.0.mlp.act" and incident.exact


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def test_gpt2_precision_analysis_and_onnx_comparison():
    import floatscope.precision

    torch.manual_seed(0)
    model = LogitsOnly(_gpt2().float()).eval()
    ids = torch.randint(0, 128, (2, 16))
    result = floatscope.precision.analyze(model, (ids,), dtype="bfloat16")
    names = {m.name for m in result.modules}
    assert "model.transformer.h.1.mlp.c_fc" in names and "model.transformer.h.0.attn" in names
    assert 0 < result.output_error < 0.05 and result.flagged == []
    embed = result.module("model.transformer.wte")
    assert embed.amplification is None  # token ids carry no error
    onnx = pytest.importorskip("onnxruntime")
    assert onnx is not None
    import floatscope.compare

    compared = floatscope.compare.onnxruntime(model, (ids,))
    assert compared.first_divergent is None and compared.matched_leaf_fraction >= 0.9
    assert compared.output.max_abs < 1e-4
