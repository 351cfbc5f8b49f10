"""The toy world: the procedural scenes, words and captions behind the embedded `toy` base, the build and
training of that base (tokenizer, VAE, denoiser, refined decoder), its image evaluator, the sample concepts
and the quality measurement of Perfusion on it.

Build-time and measurement code only: the runtime (`perfusion_hub`, `registry`, `cli`) never imports it, and
it is not part of the installed wheel; run it from a checkout (`python -m toyworld.build`, ...). Measured
figures go to bench/results/ and bench/README.md.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
