"""Turning user inputs (images, videos, chat messages) into the model's static-shaped arrays."""

from .pixels import IMAGENET_MEAN, IMAGENET_STD, normalize
