import sys

import falcon
from waitress import serve


class HelloResource:
    def on_get(self, req, resp):
        resp.media = {"hello": "from falcon on waitress"}


app = falcon.App()
app.add_route("/", HelloResource())

if __name__ == "__main__":
    serve(app, host="127.0.0.1", port=int(sys.argv[1]))
