"""Exports of a finished run into other tools' formats.

    merge.py  the base model with the method folded in (``tunelab merge --dtype``), and how the
              base is named in every export (hub id / the user's name, never a cache path)
    gguf.py   a llama.cpp GGUF file of the merged model (``tunelab export --format gguf``)
    card.py   the model card (README.md) every export writes
"""
