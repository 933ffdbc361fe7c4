"""``dockyard d1 ...``: wrangler's local D1 commands, on the file ``dockyard dev`` uses.

    dockyard d1 execute NAME --local --command "SELECT 1"
    dockyard d1 execute NAME --local --file schema.sql [--json]
    dockyard d1 migrations list NAME --local
    dockyard d1 migrations apply NAME --local

NAME is the database's ``database_name`` or its binding. ``--local`` is the default
(and the only mode: Dockyard has no remote D1); ``--remote`` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..bindings import d1_database
from ..bindings.d1 import D1Database, D1PreparedStatement, apply_migration, pending_migrations
from ..config import Config, load_config
from ..errors import BindingError, ConfigError

app = typer.Typer(help="Run SQL and migrations on a project's local D1 databases.")
migrations_app = typer.Typer(help="List and apply the migrations in migrations_dir.")
app.add_typer(migrations_app, name="migrations")
console = Console()

ProjectOption = Annotated[
    Path, typer.Option("--project", "-p", help="Project folder with the wrangler config.")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Config file to use.")]
LocalOption = Annotated[
    bool, typer.Option("--local/--remote", help="Use the local database (the only kind).")
]
NameArgument = Annotated[str, typer.Argument(help="The database_name or binding.")]


def _open(
    project: Path, config_path: Path | None, name: str, local: bool
) -> tuple[Config, D1Database]:
    if not local:
        raise BindingError("Dockyard has no remote D1: use --local (the default)")
    config = load_config(project, config_path)
    database = d1_database(config, project.resolve() / ".dockyard", name)
    if database is None:
        known = ", ".join(d.name for d in config.d1_databases) or "none"
        raise ConfigError(
            f'no D1 database named "{name}" in d1_databases (known: {known})',
            file=config.config_path.name,
        )
    return config, database


def _show(results: list[Any]) -> None:
    for result in results:
        rows = result["results"]
        if not rows:
            meta = result["meta"]
            console.print(
                f"[green]OK[/] {meta['changes']} change(s), {meta['rows_read']} row(s) read, "
                f"{meta['duration']:.1f} ms",
                highlight=False,
            )
            continue
        table = Table()
        for column in rows[0]:
            table.add_column(Text(str(column)))
        for row in rows:
            table.add_row(*(Text("NULL" if v is None else str(v)) for v in row.values()))
        console.print(table)


@app.command()
def execute(
    name: NameArgument,
    local: LocalOption = True,
    command: Annotated[
        str | None, typer.Option("--command", help="SQL to run (one or more statements).")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A .sql file to run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    project: ProjectOption = Path("."),
    config: ConfigOption = None,
) -> None:
    """Run SQL against a local D1 database (as `wrangler d1 execute --local`)."""
    from . import _run

    def action() -> int:
        if (command is None) == (file is None):
            raise BindingError("give exactly one of --command SQL or --file FILE")
        _, database = _open(project, config, name, local)
        try:
            sql = command if command is not None else _read(file)
            results = asyncio.run(_execute(database, sql))
        finally:
            database.close()
        if as_json:
            typer.echo(json.dumps(results, indent=2, default=str))
        else:
            _show(results)
        return 0

    raise typer.Exit(_run(action))


def _read(file: Path | None) -> str:
    assert file is not None
    try:
        return file.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise BindingError(f"cannot read {file}: {error.strerror}") from None


async def _execute(database: D1Database, sql: str) -> list[Any]:
    from ..bindings.d1 import split_statements

    statements = [D1PreparedStatement(database, s) for s in split_statements(sql)]
    return list(await database.batch(statements))


@migrations_app.command("list")
def list_migrations(
    name: NameArgument,
    local: LocalOption = True,
    project: ProjectOption = Path("."),
    config: ConfigOption = None,
) -> None:
    """Show the migrations not yet applied."""
    from . import _run

    def action() -> int:
        with _migrations(project, config, name, local) as (_, _, pending):
            if not pending:
                console.print("No migrations to apply.")
            for path in pending:
                console.print(Text(path.name))
        return 0

    raise typer.Exit(_run(action))


@migrations_app.command("apply")
def apply(
    name: NameArgument,
    local: LocalOption = True,
    project: ProjectOption = Path("."),
    config: ConfigOption = None,
) -> None:
    """Apply pending migrations in name order, each in its own transaction."""
    from . import _run

    def action() -> int:
        with _migrations(project, config, name, local) as (database, table, pending):
            if not pending:
                console.print("No migrations to apply.")
            for path in pending:
                apply_migration(database, path, table)
                console.print(Text(f"applied {path.name}"))
        return 0

    raise typer.Exit(_run(action))


@contextlib.contextmanager
def _migrations(
    project: Path, config: Path | None, name: str, local: bool
) -> Iterator[tuple[D1Database, str, list[Path]]]:
    """The open database, its migrations table and the migration files not yet applied
    to it (in name order); the database is closed afterwards."""
    loaded, database = _open(project, config, name, local)
    try:
        spec = _spec(loaded, name)
        folder = loaded.config_path.parent / spec.migrations_dir
        yield (
            database,
            spec.migrations_table,
            pending_migrations(database, folder, spec.migrations_table),
        )
    finally:
        database.close()


def _spec(config: Config, name: str) -> Any:
    return next(d for d in config.d1_databases if name in (d.name, d.binding))
