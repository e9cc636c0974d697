"""``museformer studio``: a local web page to make, see and hear songs (the ``studio`` extra).

The package is a leaf: it imports the core (``generate``, ``songs``, ``render``, ``files``) and
nothing in the core imports it. One file per concern:

- ``settings.py``: the models on offer and a page's request, checked field by field (a bad value
  is a ``ParameterError`` naming the field, answered with HTTP 400 and shown on the page);
- ``features.py``: optional library features found by import (form plans, bar infilling), so the
  page shows their controls exactly when the installed package has them;
- ``notes.py``: a song as note JSON for the page's piano roll and in-browser synthesizer;
- ``jobs.py``: the one generation job that may run at a time, in a worker thread, and the songs
  folder it writes (atomically; only finished songs are listed);
- ``app.py``: the Starlette routes and ``serve()`` (uvicorn);
- ``static/``: the page (HTML, CSS, JavaScript), shipped as package data: nothing is fetched from
  the internet at run time.
"""
