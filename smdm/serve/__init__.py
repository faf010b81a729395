"""`smdm serve`: an OpenAI-compatible HTTP server over smdm's samplers, with request batching and a playground.

app.py translates HTTP to jobs and back (OpenAI schemas, errors, auth); batcher.py only schedules jobs into
batched sampler calls on one worker thread; static/ is the playground page. FastAPI and uvicorn are the optional
extra `serve` (pip install -e ".[serve]"); nothing here is imported by the rest of smdm.
"""
