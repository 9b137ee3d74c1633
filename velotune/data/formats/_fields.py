"""Field checks shared by the format modules: find a row's fields, read text values, name what is missing."""

from velotune.errors import DataError


def _listing(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names) if names else "no fields"


def resolve_fields(
    row: dict, fmt: str, required: tuple[str, ...], optional: tuple[str, ...], aliases: dict[str, str], source: str
) -> dict:
    """Return the row keyed by canonical field names, or raise naming the fields needed and found.

    A field is found under its canonical name or, when that is absent, under another case or a known alias,
    so that e.g. `Complex_CoT` is read as `thinking`.
    """
    known = set(required) | set(optional)
    lookup = {**aliases, **{name: name for name in known}}
    out = {k: v for k, v in row.items() if k in known}
    for key, value in row.items():
        canonical = lookup.get(key.lower()) if isinstance(key, str) else None
        if canonical is not None and canonical not in out:
            out[canonical] = value
    missing = [name for name in required if name not in out]
    if missing:
        quoted = ", ".join(f'"{m}"' for m in missing)
        raise DataError(
            f"{source}: missing {quoted}; {fmt} rows need {' and '.join(required)} "
            f"(this row has: {_listing([str(k) for k in row])}); rename your fields with field_map, "
            f"e.g. field_map: {{your_name: {missing[0]}}}, or set dataset_format to the one your data uses"
        )
    return out


def text_field(row: dict, name: str, source: str, *, required: bool = True) -> str:
    """The string value of `name`; optional fields that are absent or null read as ""."""
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = "null" if value is None else type(value).__name__
        raise DataError(f'{source}: field "{name}" is {found}; expected text (a string)')
    return value
