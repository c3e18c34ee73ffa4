import sys

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "hello from the flask dev server"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), use_reloader=False)
