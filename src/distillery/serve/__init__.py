"""Serving (issue 14): an OpenAI-compatible server for a run's models and a calibrated confidence router.

app.py (FastAPI app, ``serve``, ``ServerThread``), config.py (``ServeConfig``), schemas.py (request
bodies, OpenAI-style errors), backends.py (in-process and forwarded models), batching.py (the
dynamic batcher), engine.py (batched generate and prompt scoring), openai_format.py (response JSON),
metrics.py (Prometheus), router.py (the cascade and its calibration run), calibration.py (isotonic
fit, threshold choice), rollout.py, drift.py, playground.py. See docs/serving.md.
"""
