"""The support console: ``cscart-fm console`` serves a small web console for support staff.

- ``server``: the WSGI application on a threaded ``wsgiref`` server; routing, who is asking,
  CSRF and Origin checks, roles, security headers.
- ``views``: the pages (overview, dead-letter list and page, order lookup, audit log) and the
  actions (replay, replay filtered, discard with a reason, reveal personal data), all through
  ``cscart_fm.support.dead_letters`` (its desk for the actions, as the command line) and the
  consumers' own tables.
- ``templates``: server-rendered HTML (Jinja2, autoescaping on), no JavaScript.
- ``auth``: users file and tokens, password hashes, sessions, login throttling.
- the audit log is the dead-letter desk's (``cscart_fm.support.dead_letters.audit``).

Its commands (``cscart-fm console``, ``cscart-fm console hash-password``) are the CLI's:
``cscart_fm.cli.console``.
"""
