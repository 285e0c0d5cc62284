"""Command-line options derived from a pydantic config object, so that a setting's name, default and
help live in one place: the config's field, its default and its attribute docstring.

``@config_options(ServerConfig, param="config")`` on a command whose signature has a parameter
``config: ServerConfig`` replaces that parameter with one option per field (``max_cache_tokens`` ->
``--max-cache-tokens``) and hands the command the validated config. Types map as typer maps them:
int, float, str and Path options; bool as ``--x/--no-x``; ``Literal`` as choices; ``list[str]`` as a
repeatable option; ``X | None`` as an optional X. Types with a text form (``Span``: ``A:B``) parse it;
a nested config (``PlacementSettings``) is flattened into options of its own fields. ``CliField``
adjusts one field where the command line needs it (a positional argument, a parser of its own).
A config that rejects the values raises ``typer.BadParameter`` naming the option: one line, no
traceback.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from stamen.types import Span

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CliField:
    """How one config field appears on the command line where the derived option does not fit."""

    name: str | None = None
    """The option's name, ``--name`` with dashes for underscores (default: the field's name)."""
    argument: bool = False
    """A positional argument (its metavar: the field name in capitals) instead of an option."""
    parser: Callable[[str], Any] | None = None
    """Turns the text given into the field's value; a ``ValueError`` is a usage error of the option."""
    metavar: str | None = None
    """The placeholder shown in the help (default: typer's, from the type)."""


TEXT_FORMS: dict[type, CliField] = {Span: CliField(parser=Span.parse, metavar="START:END")}
"""Field types that the command line gives as text, and how to read it."""


@dataclass(frozen=True)
class ConfigOption:
    """One derived command-line parameter and the config field it sets."""

    path: tuple[str, ...]
    """Field names from the config down to the field (longer than one for a flattened nested config)."""
    parameter: inspect.Parameter
    """The command's parameter: keyword-only, annotated with its ``typer.Option`` or ``typer.Argument``."""
    field: FieldInfo

    @property
    def flag(self) -> str:
        """How the user names it: ``--max-cache-tokens``, or ``MODEL`` for an argument."""
        if _is_argument(self.parameter):
            return self.parameter.name.upper()
        return "--" + self.parameter.name.replace("_", "-")


def _is_argument(parameter: inspect.Parameter) -> bool:
    return any(isinstance(m, typer.models.ArgumentInfo) for m in getattr(parameter.annotation, "__metadata__", ()))


def _optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(annotation, False)``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def derive_options(
    config: type[BaseModel],
    fields: Mapping[str, CliField] | None = None,
    include: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> list[ConfigOption]:
    """The command-line parameters of ``config``'s fields (``include``: only these; ``exclude``: not
    these; a required field must stay). Every field needs an attribute docstring: it is the help
    (``field_help``). ``fields`` adjusts fields by name, nested ones included."""
    fields = dict(fields or {})
    options = _derive(config, (), None, fields, include, exclude)
    unknown = set(fields) - {o.path[-1] for o in options} - set(exclude)
    if unknown:
        raise TypeError(f"CliField for fields {sorted(unknown)} that {config.__name__} has no option for")
    names = [o.parameter.name for o in options]
    if len(set(names)) != len(names):
        raise TypeError(f"{config.__name__}: flattened fields share an option name: {names}")
    return options


def _derive(config: type[BaseModel], prefix: tuple[str, ...], defaults: BaseModel | None,
            fields: Mapping[str, CliField], include: Collection[str] | None,
            exclude: Collection[str]) -> list[ConfigOption]:
    options = []
    for name, info in config.model_fields.items():
        if not prefix and ((include is not None and name not in include) or name in exclude):
            if info.is_required():
                raise TypeError(f"{config.__name__}.{name} is required: it cannot be left off the command line")
            continue
        if defaults is not None:
            default = getattr(defaults, name)
        elif info.is_required():
            default = inspect.Parameter.empty
        else:
            default = info.get_default(call_default_factory=True)
        inner, optional = _optional(info.annotation)
        if _is_config(inner) and not optional:
            nested = default if isinstance(default, BaseModel) else None
            options += _derive(inner, (*prefix, name), nested, fields, None, ())
            continue
        help_text = field_help(config, name)
        cli = fields.get(name) or TEXT_FORMS.get(inner, CliField())
        flag = (cli.name or name).replace("_", "-")
        annotation: Any = info.annotation
        if cli.parser is not None:  # typer reads the text with the parser; the default stays a value
            annotation = inner | None if optional else inner
            if not (default is None or default is inspect.Parameter.empty):
                raise TypeError(f"{config.__name__}.{name}: a parsed option needs no default or None")
        parser = _usage_errors(cli.parser) if cli.parser is not None else None
        if cli.argument:
            info_ = typer.Argument(help=help_text, metavar=cli.metavar, parser=parser,
                                   show_default=default is not None)
        else:
            decl = f"--{flag}/--no-{flag}" if inner is bool else f"--{flag}"
            info_ = typer.Option(decl, help=help_text, metavar=cli.metavar, parser=parser,
                                 show_default=default is not None)
        parameter = inspect.Parameter(flag.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=default,
                                      annotation=Annotated[annotation, info_])
        options.append(ConfigOption((*prefix, name), parameter, info))
    return options


def _usage_errors(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parser`` whose ``ValueError`` is the option's usage error, with the parser's message as it is."""

    @functools.wraps(parser)
    def parse(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return parse


def field_help(config: type[BaseModel], name: str) -> str:
    """A field's help: its description, which ``ConfigDict(use_attribute_docstrings=True)`` fills from
    the attribute docstring; for a config without it, the docstring read from the class's source."""
    description = config.model_fields[name].description or attribute_docstrings(config).get(name)
    if not description:
        raise TypeError(f"{config.__name__}.{name} has no docstring: it is the option's help")
    return description


@functools.cache
def attribute_docstrings(config: type[BaseModel]) -> dict[str, str]:
    """The string literal under each annotated attribute of ``config`` and its bases, as pydantic's
    ``use_attribute_docstrings`` reads them (cleaned with ``inspect.cleandoc``)."""
    docs: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def build_config(config: type[BaseModel], options: list[ConfigOption], values: Mapping[str, Any]) -> BaseModel:
    """The config from the parameters' values (by parameter name); ``typer.BadParameter`` in one line
    naming the options when the config rejects them."""
    data: dict[str, Any] = {}
    for option in options:
        target = data
        for key in option.path[:-1]:
            target = target.setdefault(key, {})
        target[option.path[-1]] = values[option.parameter.name]
    try:
        return config(**data)
    except ValidationError as e:
        problems = explain(e, options)
        if len(problems) == 1 and problems[0][0] is not None:
            raise typer.BadParameter(problems[0][1], param_hint=f"'{problems[0][0]}'") from None
        raise typer.BadParameter("; ".join(f"{flag}: {msg}" if flag else msg for flag, msg in problems)) from None


def explain(error: ValidationError, options: list[ConfigOption]) -> list[tuple[str | None, str]]:
    """Each problem of a ``ValidationError`` as (the option at fault, or None for a rule between
    options; a one-line message), e.g. ``("--port", "Input should be less than 65536")``."""
    problems = []
    for item in error.errors():
        loc = tuple(str(k) for k in item["loc"])
        flags = [o.flag for o in options if loc[: len(o.path)] == o.path]
        message = " ".join(item["msg"].removeprefix("Value error, ").split())
        problems.append((flags[0] if flags else None, message))
    return problems


def config_options(
    config: type[BaseModel],
    param: str,
    fields: Mapping[str, CliField] | None = None,
    include: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> Callable[[F], F]:
    """Decorate a command (under ``@app.command()``) whose parameter ``param`` is a ``config``: the
    command line gets ``config``'s fields as options in that parameter's place (see ``derive_options``)
    and the command the validated config."""
    options = derive_options(config, fields, include, exclude)

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        if param not in signature.parameters:
            raise TypeError(f"{func.__name__} has no parameter {param!r}")
        parameters: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name == param:
                parameters += [o.parameter for o in options]
            else:
                parameters.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                            annotation=hints.get(p.name, p.annotation)))
        names = [p.name for p in parameters]
        if len(set(names)) != len(names):
            raise TypeError(f"{func.__name__}: its own options and {config.__name__}'s share a name")
        own = [n for n in signature.parameters if n != param]

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            built = build_config(config, options, values)
            return func(**{n: values[n] for n in own}, **{param: built})

        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.config_options = options  # type: ignore[attr-defined]
        return typing.cast(F, command)

    return decorate
