"""The app bench/image.py builds into a secure and a plain image: Flask, one JSON route."""

import sys

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/")
def index():  # type: ignore[no-untyped-def]
    return jsonify(ok=True)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]))
