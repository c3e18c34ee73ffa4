import glob
import logging
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler

log = logging.getLogger("compat")
log.setLevel(logging.INFO)
log.addHandler(RotatingFileHandler("app.log", maxBytes=2000, backupCount=3))
log.addHandler(TimedRotatingFileHandler("timed.log", when="midnight", backupCount=2))
for i in range(200):
    log.info("line %d: %s", i, "x" * 40)
logging.shutdown()
print("files", sorted(glob.glob("app.log*")), len(open("timed.log").read().splitlines()))
