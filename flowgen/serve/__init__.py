"""`flowgen serve`: the Runware task protocol (REST and WebSocket on one port) in front of the engine.

app.py is the transport (Starlette), protocol.py the wire shapes, tasks.py what each task does,
inputs.py where input images come from, store.py what survives a restart, auth.py the API keys.
The batcher (batcher.py) owns the engines and batches work across every connection.
"""
