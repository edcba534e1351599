"""One-off probes behind a lever or a question (import timing, an actor's start, mixed image
sizes, a whole-flow A/B) and the GPU kit (``gpu_check.sh``, ``make_bundle.sh``): what they found
is in benchmarks/RESULTS.md. ``make bench`` does not run them.
"""
