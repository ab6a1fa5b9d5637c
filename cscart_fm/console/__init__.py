"""The support console: ``cscart-fm console`` serves a small web console for support staff.

- ``server``: the WSGI application on a threaded ``wsgiref`` server; routing, who is asking,
  CSRF and Origin checks, roles, security headers.
- ``views``: the pages (overview, dead-letter list and page, order lookup, audit log) and the
  actions (replay, replay filtered, discard with a reason, reveal personal data), all through
  ``cscart_fm.dead_letters`` and the consumers' own tables.
- ``templates``: server-rendered HTML (Jinja2, autoescaping on), no JavaScript.
- ``auth``: users file and tokens, password hashes, sessions, login throttling.
- ``audit``: the ``console_audit`` table.
- ``cli``: ``cscart-fm console`` and ``cscart-fm console hash-password``.

Nothing here is imported by ``cscart-fm`` until the ``console`` command runs.
"""

from .cli import register

__all__ = ["register"]
