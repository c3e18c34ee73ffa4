import sys

from flask import Flask, jsonify
from waitress import serve

app = Flask(__name__)


@app.route("/")
def index():
    return "hello from flask on waitress"


@app.route("/api/items/<int:n>")
def items(n):
    return jsonify(items=list(range(n)))


if __name__ == "__main__":
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4)
