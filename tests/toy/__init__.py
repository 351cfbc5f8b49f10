"""Toy-world tests: the procedural world, words and tokenizer, the embedded toy base, its decoder and evaluator."""
