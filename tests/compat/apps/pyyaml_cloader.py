# PyYAML's wheels ship libyaml bindings; an app that asks for the fast loader must get it, not silently the slow one.
import yaml
from yaml import CSafeLoader

print("libyaml", yaml.__with_libyaml__, yaml.load("a: [1, 2]", Loader=CSafeLoader))
