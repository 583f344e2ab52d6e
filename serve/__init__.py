"""Talk to a trained model: an OpenAI-compatible HTTP server with a chat page (server.py, run as
`python serve/server.py out/model.pt`), its wire format (openai_api.py), continuous batching
(batching.py) and the arena page that compares models blind (arena.py)."""
