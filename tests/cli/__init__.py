"""CLI tests: `pfx` commands through click and as real subprocesses, the samples and the README's first command."""
