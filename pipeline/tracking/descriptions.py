"""A registered version's Markdown description, in sections: the verdict, the comparison with the
champion, the lineage (training run, dataset, code, Airflow run) and the history (registered, compared,
promoted, replaced, rolled back; one dated line each, appended, never rewritten).

The verdict is the first paragraph, without a heading: MLflow's versions table shows a description's first
line, so the list of versions says what became of each. The other sections follow under `### ` headings.
The registry updates a section at a time: `update` parses the current description (the text before the
first heading is the verdict), replaces the sections it is given, appends to the history and keeps every
other section (one a person added by hand under a heading of its own, too).
"""
from __future__ import annotations

import time
from typing import Mapping

VERDICT, COMPARISON, LINEAGE, HISTORY = "Verdict", "Comparison with the champion", "Lineage", "History"
ORDER = (VERDICT, COMPARISON, LINEAGE, HISTORY)


def parse(text: str | None) -> dict[str, str]:
    """{heading: body} in the order found; the text before the first heading is the VERDICT."""
    sections: dict[str, list[str]] = {VERDICT: []}
    current = VERDICT
    for line in (text or "").splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            sections.setdefault(current, [])
        else:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items() if "\n".join(v).strip()}


def render(sections: Mapping[str, str]) -> str:
    """The verdict first, without a heading; then ours in ORDER; then any other section as found."""
    ordered = [k for k in ORDER[1:] if sections.get(k)] + [k for k in sections if k not in ORDER]
    parts = [sections[VERDICT]] if sections.get(VERDICT) else []
    parts += [f"### {k}\n\n{sections[k]}" for k in ordered if sections.get(k)]
    return "\n\n".join(parts) + "\n"


def update(text: str | None, sections: Mapping[str, str] | None = None, event: str | None = None) -> str:
    """`text` with `sections` replaced and `event` appended to the history as a dated line."""
    current = parse(text)
    current.update({k: v.strip() for k, v in (sections or {}).items()})
    if event:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        current[HISTORY] = "\n".join(filter(None, [current.get(HISTORY, ""), f"- {stamp}: {event}"]))
    return render(current)


def history(text: str | None) -> list[str]:
    """The history's lines, oldest first."""
    return [line[2:] for line in parse(text).get(HISTORY, "").splitlines() if line.startswith("- ")]


def verdict_section(verdict: str) -> str:
    head, _, why = verdict.partition(": ")
    return f"**{head}**" + (f": {why}" if why else "")
