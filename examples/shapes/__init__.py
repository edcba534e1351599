"""A small detector for synthetic shapes, trained from scratch on CPU (see README.md)."""
