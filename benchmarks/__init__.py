"""difflr's benchmark suite: what the Learner costs against hand-written Lightning and plain PyTorch.

Run it with ``python -m benchmarks.run`` (``--quick`` for a short smoke run). It is not part of
the test suite (pytest only collects ``tests/``). See ``docs/benchmarks.md`` for the latest
figures and for how each number is measured.
"""
