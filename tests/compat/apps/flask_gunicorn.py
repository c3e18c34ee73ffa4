import os

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return f"hello from flask on gunicorn worker {os.getpid()}"
