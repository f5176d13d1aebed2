"""imgproxy: a fast HTTP image-serving and transformation proxy."""

__version__ = "0.1.0"
