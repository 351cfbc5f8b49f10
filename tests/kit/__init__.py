"""The test kit: every helper the tests and bench/ share (tests import it, bench imports it; neither imports
a test module).

  s3         a real S3 server (moto's WSGI app, single-threaded) on 127.0.0.1, buckets, test credentials
  proxy      one fault-injecting HTTP proxy between boto3 and that server (rules, seeded chaos, counts)
  concepts   valid v1 concept files without torch, and homes/registries holding them
  engine     synthetic concepts on the embedded toy base, photo folders (imports torch)
  runner     the one way to run the real `pfx` in a subprocess (environment, kill -9, resource limits)
  checks     consistency checkers of a home and of a remote
  scenarios  the hardening scenarios (faults, kill -9, concurrency) that tests run small and bench/ big
  fuzz       the structured concept-file fuzzer and its oracle

The fixtures themselves (toy_base, toy_cov, clean_base, s3_url, bucket, aws_env) are in tests/conftest.py.
"""
