# ruff: noqa: E501 - HTML templates read better with their long lines
"""The console's pages: Jinja2 templates with autoescaping on, and its one stylesheet.

Kept in this module (not as files) so that the wheel, and so the image, carries them with no
package-data configuration. No JavaScript anywhere: every page and action works without it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from cscart_fm.core.durations import describe_age

CSS = """
:root { --fg:#1d232b; --muted:#5b6573; --line:#d8dde3; --bg:#f6f7f9; --accent:#0b5cad;
        --bad:#a61b1b; --badbg:#fdecec; --ok:#1f6f2b; --okbg:#e8f5ea; --warnbg:#fff4d6; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; gap:1.5rem; align-items:center; padding:.6rem 1.2rem; background:#fff;
         border-bottom:1px solid var(--line); flex-wrap:wrap; }
header .brand { font-weight:600; color:var(--fg); text-decoration:none; }
header nav a { margin-right:1rem; color:var(--accent); text-decoration:none; }
header nav a.here { font-weight:600; text-decoration:underline; }
header .who { margin-left:auto; color:var(--muted); display:flex; gap:.5rem; align-items:center; }
main { padding:1rem 1.2rem 3rem; max-width:1280px; }
h1 { font-size:1.4rem; margin:.4rem 0 1rem; } h2 { font-size:1.1rem; margin:1.6rem 0 .5rem; }
table { border-collapse:collapse; width:100%; background:#fff; }
th, td { text-align:left; padding:.4rem .55rem; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { background:#eef1f4; font-weight:600; font-size:.9rem; }
tr.stalled td { background:var(--warnbg); }
.muted { color:var(--muted); } .num { text-align:right; }
.flash { padding:.6rem .8rem; border-radius:4px; margin:.3rem 0 1rem; }
.flash.ok { background:var(--okbg); color:var(--ok); }
.flash.error { background:var(--badbg); color:var(--bad); }
.flash.warning { background:var(--warnbg); }
.status { display:inline-block; padding:.05rem .45rem; border-radius:3px; font-size:.85rem;
          font-weight:600; text-transform:uppercase; }
.status-open { background:var(--badbg); color:var(--bad); }
.status-replayed { background:var(--warnbg); }
.status-resolved { background:var(--okbg); color:var(--ok); }
.status-discarded { background:#eceff2; color:var(--muted); }
form.inline { display:inline; }
form.filters { display:flex; gap:.7rem; flex-wrap:wrap; align-items:end; background:#fff;
               padding:.7rem; border:1px solid var(--line); margin-bottom:1rem; }
form.filters label, form.stack label { display:flex; flex-direction:column; font-size:.85rem;
               color:var(--muted); gap:.15rem; }
form.stack { display:flex; flex-direction:column; gap:.6rem; max-width:34rem; }
input, select, textarea, button { font:inherit; }
input, select, textarea { padding:.3rem .4rem; border:1px solid #b9c1ca; border-radius:3px; }
button { padding:.35rem .8rem; border:1px solid var(--accent); background:var(--accent);
         color:#fff; border-radius:3px; cursor:pointer; }
button.secondary { background:#fff; color:var(--accent); }
button.danger { background:var(--bad); border-color:var(--bad); }
.box { background:#fff; border:1px solid var(--line); padding:.8rem 1rem; margin-bottom:1rem; }
.actions { display:flex; gap:2rem; flex-wrap:wrap; align-items:flex-start; }
pre { background:#fff; border:1px solid var(--line); padding:.7rem; overflow:auto;
      font-size:.85rem; max-height:36rem; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:.25rem 1rem; margin:0; }
dl.facts dt { color:var(--muted); }
.paging { display:flex; gap:1rem; margin:.8rem 0; align-items:center; }
.login { max-width:22rem; margin:4rem auto; background:#fff; padding:1.5rem;
         border:1px solid var(--line); }
""".strip()

TEMPLATES: dict[str, str] = {}

TEMPLATES["macros.html"] = """
{% macro csrf_field() %}<input type="hidden" name="csrf_token" value="{{ csrf }}">{% endmacro %}
{% macro status(value) %}<span class="status status-{{ value }}">{{ value }}</span>{% endmacro %}
{% macro when(value) %}{% if value %}<time datetime="{{ value.isoformat() }}">{{ value|moment }}</time>
<span class="muted">({{ value|ago }})</span>{% else %}<span class="muted">never</span>{% endif %}{% endmacro %}
"""

TEMPLATES["base.html"] = """
{%- import "macros.html" as m with context -%}
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
{% block head %}{% endblock %}
<title>{{ title }} · cscart-fm console</title>
<link rel="stylesheet" href="/static/console.css">
</head>
<body>
<header>
  <a class="brand" href="/">cscart-fm support console</a>
  {% if user %}
  <nav>
    <a href="/" {% if section == "overview" %}class="here"{% endif %}>Overview</a>
    <a href="/letters" {% if section == "letters" %}class="here"{% endif %}>Dead letters</a>
    <a href="/orders" {% if section == "orders" %}class="here"{% endif %}>Order lookup</a>
    <a href="/audit" {% if section == "audit" %}class="here"{% endif %}>Audit log</a>
  </nav>
  <div class="who"><span id="who">{{ user.name }} ({{ user.role }})</span>
    {% if user.via == "password" %}
    <form class="inline" method="post" action="/logout">{{ m.csrf_field() }}
      <button class="secondary" type="submit">Log out</button></form>
    {% endif %}
  </div>
  {% endif %}
</header>
<main>
{% for kind, text in flash %}<p class="flash {{ kind }}" role="status">{{ text }}</p>{% endfor %}
{% if collect_warning %}<p class="flash warning" role="status">{{ collect_warning }}</p>{% endif %}
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

TEMPLATES["login.html"] = """
{% extends "base.html" %}
{% block main %}
<div class="login">
<h1>Log in</h1>
{% if error %}<p class="flash error" role="alert" id="login-error">{{ error }}</p>{% endif %}
<form class="stack" method="post" action="/login">
  <input type="hidden" name="login_token" value="{{ login_token }}">
  <input type="hidden" name="next" value="{{ next }}">
  <label>Name <input name="username" id="username" autocomplete="username" required
         value="{{ username }}" autofocus></label>
  <label>Password <input name="password" id="password" type="password"
         autocomplete="current-password" required></label>
  <button type="submit" id="login">Log in</button>
</form>
</div>
{% endblock %}
"""

TEMPLATES["overview.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>Overview</h1>
<p>{% if overview.open_letters %}<a href="/letters"><strong id="open-total">{{ overview.open_letters }}</strong>
open dead letter(s)</a> need a person.{% else %}<span id="open-total">No</span> open dead letters.{% endif %} Times are {{ zone_name }}.</p>
{% for note in overview.notes %}<p class="flash warning">{{ note }}</p>{% endfor %}
{% if clients_error %}<p class="flash warning">The clients file could not be read, so clients and
their poll intervals are not known here: {{ clients_error }}</p>{% endif %}
<table id="clients">
<thead><tr><th>Client</th>{% for column in overview.columns %}<th{% if column.kind != "time" %} class="num"{% endif %}>{{ column.title }}</th>{% endfor %}
<th class="num">Open dead letters</th></tr></thead>
<tbody>
{% for c in overview.clients %}
<tr id="client-{{ c.client_id }}" {% if c.stalled %}class="stalled"{% endif %}>
  <td><strong>{{ c.client_id }}</strong>{% if not c.configured %}<br><span class="muted">not in the clients file</span>{% endif %}
    {% if c.stalled %}<br><span class="stall-warning">&#9888; {{ c.stalled }}</span>{% endif %}</td>
  {% for column in overview.columns %}{% set value = c.cells[loop.index0] %}
  {% if column.kind == "time" %}<td>{{ m.when(value) }}</td>
  {% elif not overview.known[loop.index0] %}<td class="num"><span class="muted">unknown</span></td>
  {% else %}<td class="num">{{ value }}{% if column.kind == "count_today" %}
    <br><span class="muted">since 00:00 {{ c.zone.key }}</span>{% endif %}</td>{% endif %}
  {% endfor %}
  <td class="num">{% if c.open_letters %}<a href="/letters?client={{ c.client_id|urlencode }}">{{ c.open_letters }}</a>{% else %}0{% endif %}</td>
</tr>
{% else %}
<tr><td colspan="{{ overview.columns|length + 2 }}" class="muted">No clients yet: none in the clients file and nothing recorded.</td></tr>
{% endfor %}
</tbody>
</table>
{% endblock %}
"""

TEMPLATES["letters.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>Dead letters</h1>
<form class="filters" method="get" action="/letters" id="filters">
  <label>Status <select name="status" id="f-status">
    {% for s in statuses %}<option value="{{ s }}" {% if s == form.status %}selected{% endif %}>{{ s }}</option>{% endfor %}
  </select></label>
  <label>Consumer <select name="consumer" id="f-consumer"><option value="">any</option>
    {% for name in consumers %}<option {% if name == form.consumer %}selected{% endif %}>{{ name }}</option>{% endfor %}
  </select></label>
  <label>Client <input name="client" id="f-client" list="client-ids" value="{{ form.client }}" size="10"></label>
  <datalist id="client-ids">{% for cid in client_ids %}<option value="{{ cid }}">{% endfor %}</datalist>
  <label>Error type <select name="type" id="f-type"><option value="">any</option>
    {% for name, title in error_types %}<option value="{{ name }}" {% if name == form.type %}selected{% endif %}>{{ name }}</option>{% endfor %}
  </select></label>
  <label>From (date) <input type="date" name="since" id="f-since" value="{{ form.since }}"></label>
  <label>To (date, included) <input type="date" name="until" id="f-until" value="{{ form.until }}"></label>
  <button type="submit" id="apply-filters">Filter</button>
  <a href="/letters">Clear</a>
</form>
{% for problem in problems %}<p class="flash error">{{ problem }}</p>{% endfor %}
<p id="summary">{% if total %}Dead letters {{ first }}–{{ last }} of <strong>{{ total }}</strong>
({{ form.status }}), newest first. Times are {{ zone_name }}.{% else %}No {{ form.status }} dead letters{% if narrowed %} match these filters{% endif %}.{% endif %}</p>
{% if rows %}
<table id="letters">
<thead><tr><th>#</th><th>Dead-lettered</th><th>Consumer</th><th>Client</th><th>Error type</th>
<th>Reason</th><th class="num">Attempts</th><th>Status</th></tr></thead>
<tbody>
{% for r in rows %}
<tr id="letter-{{ r.id }}">
  <td><a href="/letters/{{ r.id }}">{{ r.id }}</a></td>
  <td>{{ r.dead_lettered_at|moment }}</td>
  <td>{{ r.consumer }}</td><td>{{ r.client_id or "–" }}</td>
  <td>{{ r.error_type }}</td>
  <td><a href="/letters/{{ r.id }}">{{ r.reason|truncate(90) }}</a></td>
  <td class="num">{{ r.attempts }}</td>
  <td>{{ m.status(r.status) }}</td>
</tr>
{% endfor %}
</tbody>
</table>
<div class="paging">
  {% if prev_url %}<a href="{{ prev_url }}" id="newer">&larr; Newer</a>{% endif %}
  <span class="muted">Page {{ page }} of {{ pages }}</span>
  {% if next_url %}<a href="{{ next_url }}" id="older">Older &rarr;</a>{% endif %}
</div>
{% endif %}
{% if user.is_operator and open_matching %}
<form method="post" action="/letters/replay" class="box">
  {{ m.csrf_field() }}
  {% for name, value in filter_fields %}<input type="hidden" name="{{ name }}" value="{{ value }}">{% endfor %}
  <p>Once the cause is fixed, send the <strong>{{ open_matching }}</strong> open dead letter(s)
  matching these filters back to their consumers. You will be asked to confirm.</p>
  <button type="submit" id="replay-filtered">Replay the {{ open_matching }} open dead letter(s) matching these filters…</button>
</form>
{% endif %}
{% endblock %}
"""

TEMPLATES["confirm_replay.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>Replay {{ letters|length }} dead letter(s)?</h1>
<p>Filters: {{ description }}.</p>
{% if more %}<p class="flash warning" id="more">{{ more_text }}</p>{% endif %}
<p>They go to (exchange / routing key, from each one's job, never from its headers):</p>
<ul id="destinations">{% for where, n in destinations.items() %}<li>{{ where }}: {{ n }}</li>{% endfor %}</ul>
{% if unreplayable %}<p class="flash warning" id="unreplayable">Not replayed, as none of their
job's events: {% for id, why in unreplayable.items() %}#{{ id }} ({{ why }}){% if not loop.last %}; {% endif %}{% endfor %}.</p>{% endif %}
<p>Each is sent back, unchanged, to its job's queue; the consumers are idempotent, so a
replay of something that already happened does no harm. A dead letter is marked resolved when
its consumer then succeeds.</p>
<form method="post" action="/letters/replay" class="box">
  {{ m.csrf_field() }}
  <input type="hidden" name="confirm" value="yes">
  <input type="hidden" name="ids" value="{{ ids }}">
  {% for name, value in filter_fields %}<input type="hidden" name="{{ name }}" value="{{ value }}">{% endfor %}
  <button type="submit" id="confirm-replay">Replay these {{ letters|length }} dead letter(s)</button>
  <a href="{{ back_url }}">Cancel</a>
</form>
<table id="letters">
<thead><tr><th>#</th><th>Dead-lettered</th><th>Consumer</th><th>Client</th><th>Error type</th><th>Reason</th></tr></thead>
<tbody>
{% for r in letters[:100] %}
<tr><td><a href="/letters/{{ r.id }}">{{ r.id }}</a></td><td>{{ r.dead_lettered_at|moment }}</td>
<td>{{ r.consumer }}</td><td>{{ r.client_id or "–" }}</td><td>{{ r.error_type }}</td>
<td>{{ r.reason|truncate(90) }}</td></tr>
{% endfor %}
</tbody>
</table>
{% if letters|length > 100 %}<p class="muted">… and {{ letters|length - 100 }} more.</p>{% endif %}
{% endblock %}
"""

TEMPLATES["letter.html"] = """
{% extends "base.html" %}
{% block head %}{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}{% endblock %}
{% block main %}
<h1>Dead letter #{{ letter.id }} <span id="status">{{ m.status(letter.status) }}</span></h1>
{% if refresh %}<p class="flash warning" id="waiting">Replayed: waiting for the {{ letter.consumer }}
consumer to handle it. This page refreshes itself every {{ refresh }} s.</p>{% endif %}
{% if letter.status == "resolved" %}<p class="flash ok" id="resolved">Resolved
{{ m.when(letter.resolved_at) }}: a later message for the same {{ key_label }} succeeded
{% if letter.resolved_by %}({{ letter.resolved_by }}){% endif %}. Nothing left to do.</p>{% endif %}
{% if letter.status == "discarded" %}<p class="flash" id="discarded">Discarded by
<strong>{{ letter.discarded_by or "?" }}</strong> {{ m.when(letter.discarded_at) }}, because:
<q id="discard-reason">{{ letter.discard_reason }}</q></p>{% endif %}

<div class="box">
<h2>What happened</h2>
<p id="what-happened">{{ letter.what_happened }}</p>
<dl class="facts">
  <dt>Reason</dt><dd id="reason">{{ details.reason }}</dd>
  <dt>Error type</dt><dd><code>{{ letter.error_type }}</code> — {{ error_title }}. {{ fate_text }}</dd>
  <dt>Attempts</dt><dd id="attempts">{{ letter.attempts }}</dd>
  <dt>Dead-lettered</dt><dd>{{ m.when(letter.dead_lettered_at) }}</dd>
  <dt>Client</dt><dd>{{ letter.client_id or "–" }}</dd>
  <dt>Consumer</dt><dd>{{ letter.consumer }}</dd>
  <dt>Replays</dt><dd>{% if letter.replay_count %}{{ letter.replay_count }} from this page or the
     command line, the last {{ m.when(letter.last_replayed_at) }}{% else %}not replayed yet{% endif %}
     {% if letter.previous_replays %}<br>This message had been replayed {{ letter.previous_replays }}
     time(s) before and failed again{% if letter.replay_of %} (it came from
     <a href="/letters/{{ letter.replay_of }}">dead letter #{{ letter.replay_of }}</a>){% endif %}.{% endif %}</dd>
</dl>
</div>

<div class="box">
<h2>What to do</h2>
<p id="action">{{ letter.action }}</p>
{% if user.is_operator %}
<div class="actions">
  <form method="post" action="/letters/{{ letter.id }}/replay">
    {{ m.csrf_field() }}
    {% if letter.status in ("open", "replayed") %}
    <p>Fixed the cause? Send it back to the {{ letter.consumer }} consumer.</p>
    <button type="submit" id="replay">Replay</button>
    {% else %}
    <input type="hidden" name="force" value="yes">
    <p>It is {{ letter.status }}. Replaying it again is harmless (the consumers are idempotent).</p>
    <button type="submit" class="secondary" id="replay">Replay anyway</button>
    {% endif %}
  </form>
  {% if letter.status in ("open", "replayed") %}
  <form method="post" action="/letters/{{ letter.id }}/discard" class="stack">
    {{ m.csrf_field() }}
    <label>Not needed? Discard it, saying why (kept with it for good):
      <textarea name="reason" id="discard-reason-input" rows="2" cols="40" required maxlength="2000"
        placeholder="e.g. FM resent the shipment"></textarea></label>
    <div><button type="submit" class="danger" id="discard">Discard</button></div>
  </form>
  {% endif %}
</div>
{% else %}
<p class="muted">You have read-only access: ask an operator to replay or discard it.</p>
{% endif %}
</div>

<h2>History</h2>
<table id="history">
<thead><tr><th>When</th><th>What</th></tr></thead>
<tbody>
{% for event in history %}
<tr><td>{{ event.at|moment }}</td><td>{{ event.text }}</td></tr>
{% endfor %}
</tbody>
</table>

<h2>Message</h2>
<dl class="facts">
  <dt>Schema</dt><dd>{{ letter.message_schema or "no schema header" }}</dd>
  <dt>message_id</dt><dd>{{ letter.message_id or "–" }}</dd>
  <dt>A replay goes to</dt><dd id="goes-to">{{ letter.goes_to }}</dd>
</dl>
{% if revealed %}
<p class="flash warning" id="revealed">Personal data shown at your request, and recorded in the
audit log. <a href="/letters/{{ letter.id }}">Mask it again</a>.</p>
{% else %}
<p class="muted" id="masked-note">Shoppers' personal data (names, e-mails, phones, addresses) is masked.</p>
{% if user.is_operator %}
<form method="post" action="/letters/{{ letter.id }}/reveal" class="inline">
  {{ m.csrf_field() }}
  <button type="submit" class="secondary" id="reveal">Reveal personal data (recorded in the audit log)</button>
</form>
{% endif %}
{% endif %}
<pre id="payload">{{ payload }}</pre>
<details><summary>Headers</summary><pre id="headers">{{ headers }}</pre></details>
{% endblock %}
"""

TEMPLATES["orders.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>Order lookup</h1>
<p>Was a CS-Cart order imported, and if not, which filter keeps it out? Asks the state store and
the client's store (read only).</p>
<form class="filters" method="get" action="/orders">
  <label>Client {% if client_ids %}<select name="client" id="o-client">
    {% for cid in client_ids %}<option {% if cid == client %}selected{% endif %}>{{ cid }}</option>{% endfor %}
  </select>{% else %}<input name="client" id="o-client" value="{{ client }}">{% endif %}</label>
  <label>CS-Cart order id or order_no <input name="order" id="o-order" value="{{ order }}" required></label>
  <button type="submit" id="lookup">Look up</button>
</form>
{% if clients_error %}<p class="flash warning">The clients file could not be read, so orders cannot
be looked up: {{ clients_error }}</p>{% endif %}
{% if error %}<p class="flash error" id="lookup-error">{{ error }}</p>{% endif %}
{% if explanation %}<pre id="explanation">{{ explanation }}</pre>{% endif %}
{% if shipments is not none %}
<h2>Shipments pushed for this order</h2>
{% if shipments %}
<table id="shipments"><thead><tr><th>FM shipment_ref</th><th>CS-Cart shipment id</th><th>Status set</th><th>Created</th></tr></thead>
<tbody>{% for s in shipments %}<tr><td>{{ s.shipment_ref }}</td><td>{{ s.shipment_id or "not yet" }}</td>
<td>{{ s.status_kind or "–" }}{% if s.status_kind and not s.status_done %} (pending){% endif %}</td><td>{{ s.created_at|moment }}</td></tr>{% endfor %}</tbody></table>
{% else %}<p class="muted">None recorded.</p>{% endif %}
{% endif %}
{% if letters_url %}<p><a href="{{ letters_url }}">Dead letters of client {{ client }}</a></p>{% endif %}
{% endblock %}
"""

TEMPLATES["audit.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>Audit log</h1>
<p>Every replay and discard, from this console or the command line (<code>cscart-fm dlq</code>),
and every console login and reveal of personal data: who, when, from where, what, why, and how
it ended. Times are {{ zone_name }}.</p>
<table id="audit">
<thead><tr><th>#</th><th>When</th><th>Who</th><th>Action</th><th>Target</th><th>Reason</th><th>Result</th><th>From</th></tr></thead>
<tbody>
{% for e in entries %}
<tr class="audit-{{ e.action }} via-{{ e.via }}"><td>{{ e.id }}</td><td>{{ e.at|moment }}</td><td>{{ e.who }}{% if e.via == "console" %} <span class="muted">({{ e.role }})</span>{% endif %}</td>
<td>{{ e.action }}</td>
<td>{% if e.letter_id %}<a href="/letters/{{ e.letter_id }}">{{ e.target }}</a>{% else %}{{ e.target }}{% endif %}</td>
<td>{{ e.reason or "" }}</td><td>{{ e.result }}</td><td class="muted">{% if e.via == "console" %}console{% if e.remote_addr %} {{ e.remote_addr }}{% endif %}{% else %}{{ e.via }}{% endif %}</td></tr>
{% else %}
<tr><td colspan="8" class="muted">Nothing yet.</td></tr>
{% endfor %}
</tbody>
</table>
<div class="paging">
  {% if prev_url %}<a href="{{ prev_url }}">&larr; Newer</a>{% endif %}
  <span class="muted">Page {{ page }} of {{ pages }}</span>
  {% if next_url %}<a href="{{ next_url }}">Older &rarr;</a>{% endif %}
</div>
{% endblock %}
"""

TEMPLATES["error.html"] = """
{% extends "base.html" %}
{% block main %}
<h1>{{ title }}</h1>
<p id="error-message">{{ message }}</p>
<p><a href="{{ back or '/' }}">Back</a></p>
{% endblock %}
"""


def environment(zone: ZoneInfo, clock: Any) -> jinja2.Environment:
    """Autoescaping on for every template; ``moment`` and ``ago`` show times in ``zone``."""
    env = jinja2.Environment(
        loader=jinja2.DictLoader({k: v.strip() + "\n" for k, v in TEMPLATES.items()}),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def moment(value: datetime | None) -> str:
        if value is None:
            return "–"
        return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")

    def ago(value: datetime | None) -> str:
        if value is None:
            return "never"
        delta: timedelta = clock() - value
        if delta.total_seconds() < -5:
            return "in " + describe_age(-delta)
        return describe_age(delta) + " ago"

    env.filters["moment"] = moment
    env.filters["ago"] = ago
    return env
