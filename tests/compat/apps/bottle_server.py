import sys

from bottle import route, run


@route("/")
def index():
    return "hello from bottle"


@route("/hello/<name>")
def hello(name):
    return f"hello {name}"


run(host="127.0.0.1", port=int(sys.argv[1]), quiet=True)
