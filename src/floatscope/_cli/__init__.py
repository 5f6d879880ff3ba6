"""The floatscope command line: one module per subcommand."""
