"""The bottom layer: what every other package may import, and which imports no other jaxlm package."""
