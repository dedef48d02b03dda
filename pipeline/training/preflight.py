"""The checklist every training job prints (a rich table) and saves (<phase>/preflight.json)
before its first step: what was loaded, from where, and whether it fits. A failed item stops the
job with its reason, before any work."""
from __future__ import annotations

from pathlib import Path

from ..data.cache import dump_json
from ..ui import console


class PreflightFailed(RuntimeError):
    pass


class Preflight:
    def __init__(self, path: Path, phase: str, write: bool = True):
        self.path, self.phase, self.items, self.write = Path(path), phase, [], write

    def add(self, item: str, ok: bool, detail: str) -> bool:
        self.items.append({"item": item, "ok": bool(ok), "detail": detail})
        return ok

    def fail(self, item: str, detail: str):
        """Record a failed item and stop now."""
        self.add(item, False, detail)
        self.finish()

    def finish(self) -> None:
        from rich.table import Table
        t = Table(title=f"preflight: {self.phase}")
        for c in ("", "item", "detail"):
            t.add_column(c)
        for it in self.items:
            t.add_row("[green]ok" if it["ok"] else "[bold red]FAIL", it["item"], it["detail"])
        console.print(t)
        failed = [it for it in self.items if not it["ok"]]
        if self.write:
            dump_json({"phase": self.phase, "ok": not failed, "items": self.items}, self.path)
        if failed:
            raise PreflightFailed("preflight failed: " + "; ".join(f"{it['item']}: {it['detail']}" for it in failed))
