"""The baseline for bench/ingest.py: a bare Flask app that answers "hello"."""
from flask import Flask


def create_app() -> Flask:
    app = Flask("hello")

    @app.post("/hello")
    def hello():
        return {"hello": "world"}

    return app
