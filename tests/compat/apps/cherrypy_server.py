import sys

import cherrypy


class HelloWorld:
    @cherrypy.expose
    def index(self):
        return "hello from cherrypy"


if __name__ == "__main__":
    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": int(sys.argv[1]),
                            "engine.autoreload.on": False})
    cherrypy.quickstart(HelloWorld())
