"""Engine tests: the rank-one edit, loaders and render on the toy base, training, CUDA paths, the concept
file format under fuzzing, hostile photos."""
