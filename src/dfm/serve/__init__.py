"""``dfm serve``: a local web page to try a trained model, watching it generate coarse to fine (see
:mod:`dfm.serve.app`; the checks in front of every request: :mod:`dfm.serve.guard`; the page: ``page.html``)."""

from dfm.serve.app import Server, create_app, running_server, serve

__all__ = ["Server", "create_app", "running_server", "serve"]
