"""The recipe language and compiler: YAML -> plain-data Plan."""
