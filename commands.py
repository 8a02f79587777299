"""The slash commands: what a typed line means, what /help lists, what Tab completes. Pure.

`parse_line` turns one typed line into a tuple the chat acts on (a say, a direct
message, a command, or a hint on how to type it); `help_rows` is /help (operator
commands for operators only, §5); `complete` is Tab, from the command table and the
names of the users here. The chat calls these on the main thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from display import sanitize
from protocol import MAX_MINUTES, name_key

BELL_MODES = ("off", "mentions", "all")
BELL_WORDS = {
    "off": "nothing (it is off)",
    "mentions": "mentions of your name and direct messages",
    "all": "every message",
}


@dataclass(frozen=True)
class Command:
    """One slash command: what it takes, what /help says, who may use it."""

    usage: str
    help: str
    op: bool = False


COMMANDS: dict[str, Command] = {
    "msg": Command("/msg NAME TEXT", "a direct message to NAME only (also /dm, /query)"),
    "me": Command("/me TEXT", "an action, shown as * you TEXT"),
    "who": Command("/who", "who is here (also /names)"),
    "whois": Command("/whois NAME", "NAME's identity, operator or not, here since when"),
    "bell": Command("/bell off|mentions|all", "when the terminal bell rings"),
    "clear": Command("/clear", "clear the screen"),
    "help": Command("/help", "this list"),
    "quit": Command("/quit", "leave (also /q, exit)"),
    "kick": Command("/kick NAME [REASON]", "close NAME's connection", op=True),
    "ban": Command(
        "/ban NAME [MINUTES] [REASON]",
        "kick NAME and refuse them (for good if no MINUTES)",
        op=True,
    ),
    "unban": Command("/unban WHO", "lift a ban (WHO as /bans lists it)", op=True),
    "bans": Command("/bans", "the bans in force", op=True),
    "mute": Command("/mute NAME MINUTES", "NAME's messages are refused (0 lifts it)", op=True),
}
ALIASES = {"dm": "msg", "query": "msg", "names": "who", "q": "quit", "exit": "quit", "?": "help"}
# Commands whose first word is a user's name (Tab completes it).
NAME_FIRST = frozenset({"msg", "whois", "kick", "ban", "mute"})
BARE = frozenset({"who", "help", "quit", "clear", "bans"})  # commands that take nothing
HELPLESS = Command("", "")  # an alias in the table: not an operator command


def help_rows(op: bool) -> list[str]:
    """/help: the commands (operator commands only for operators), then the keys."""
    rows = ["commands (in upper or lower case):", f"  {'TEXT':<24}say TEXT to everyone"]
    rows.append(f"  {'@NAME in TEXT':<24}mention NAME (highlighted for them; still public)")
    rows += [f"  {cmd.usage:<24}{cmd.help}" for cmd in COMMANDS.values() if not cmd.op]
    rows.append(f"  {'//TEXT':<24}say TEXT that starts with a slash")
    if op:
        rows.append("operator commands:")
        rows += [f"  {cmd.usage:<28} {cmd.help}" for cmd in COMMANDS.values() if cmd.op]
    rows.append("keys: Tab completes names and commands; Up/Down recall earlier lines;")
    rows.append("      Ctrl-C clears the line; Ctrl-C or Ctrl-D on an empty line leaves;")
    rows.append("      Ctrl-L redraws the screen")
    return rows


def parse_line(line: str) -> tuple[Any, ...]:
    """What a typed line means: ("say", text), ("action", text), ("dm", to, text), ("who",),
    ("whois", name), ("kick", name, reason), ("ban", name, minutes, reason), ("unban",
    who), ("bans",), ("mute", name, minutes), ("help",), ("quit",), ("clear",), ("bell",
    mode), ("hint", why) or ("skip",)."""
    stripped = line.strip()
    if not stripped:
        return ("skip",)
    if stripped.lower() == "exit":
        return ("quit",)
    if line.startswith("//"):
        return ("say", line[1:])
    if not line.startswith("/"):
        return ("say", line)
    word, _, rest = stripped.partition(" ")
    name = ALIASES.get(word[1:].lower(), word[1:].lower())
    cmd = COMMANDS.get(name)
    if cmd is None:
        shown = sanitize(word)
        return ("hint", f"unknown command {shown}: /help lists the commands (//TEXT sends text)")
    parsed = _arguments(name, rest.strip())
    return parsed if parsed is not None else ("hint", f"usage: {cmd.usage}")


def _arguments(name: str, rest: str) -> tuple[Any, ...] | None:
    """The command's arguments, or None when they do not fit its usage."""
    first, _, more = rest.partition(" ")
    more = more.lstrip(" ")
    if name in BARE:
        return None if rest else (name,)
    if name == "msg":
        return ("dm", first, more) if first and more.strip() else None
    if name == "me":
        return ("action", rest) if rest else None
    if name == "bell":
        return ("bell", rest.lower()) if rest.lower() in BELL_MODES else None
    if name in ("whois", "unban"):
        return (name, rest) if rest and " " not in rest else None
    if not first:
        return None
    if name == "kick":
        return ("kick", first, more or None)
    minutes_word, _, reason = more.partition(" ")
    digits = minutes_word.isdigit() and minutes_word.isascii()
    minutes = int(minutes_word) if digits else None  # §5: at most a year (MAX_MINUTES)
    if name == "mute":
        fits = minutes is not None and minutes <= MAX_MINUTES and not reason.strip()
        return ("mute", first, minutes) if fits else None
    if minutes is None:  # ban: no number means until unbanned, the rest is the reason
        return ("ban", first, None, more or None)
    if not 0 < minutes <= MAX_MINUTES:
        return None
    return ("ban", first, minutes, reason.strip() or None)


def complete(before: str, users: list[str], op: bool) -> tuple[str, list[str]]:
    """Tab: `before` (the line before the cursor) completed, and the candidates when
    several fit.

    Names from `users` (the others here, in the order to list them); at the start of
    the line a name gets ": " (addressing someone, as in IRC); commands after a leading
    slash, operator commands only for an operator (`op`).
    """
    start = before.rfind(" ") + 1
    head, word = before[:start], before[start:]
    first = head.split(" ", 1)[0].lower().lstrip("/")
    if start == 0 and word.startswith("/"):
        names = [c for c in (*COMMANDS, *ALIASES) if c.startswith(word[1:].lower())]
        names = [c for c in names if op or not COMMANDS.get(c, HELPLESS).op]
        return _completed(head, word, sorted({"/" + c for c in names}), " ")
    if head.startswith("/") and head.count(" ") == 1 and first == "bell":
        return _completed(head, word, [m for m in BELL_MODES if m.startswith(word)], "")
    at = "@" if word.startswith("@") else ""
    fits = [at + u for u in users if name_key(u).startswith(name_key(word[len(at) :]))]
    named = head.startswith("/") and head.count(" ") == 1
    named = named and ALIASES.get(first, first) in NAME_FIRST
    suffix = ": " if start == 0 and not at else " "
    return _completed(head, word, fits, " " if named else suffix)


def _completed(head: str, word: str, fits: list[str], suffix: str) -> tuple[str, list[str]]:
    """Complete `word` from `fits`: the one fit with `suffix`, else their common start."""
    if len(fits) == 1:
        return head + fits[0] + suffix, []
    if not fits:
        return head + word, []
    folded = [f.casefold() for f in fits]
    common = 0
    while all(len(f) > common and f[common] == folded[0][common] for f in folded):
        common += 1
    if common > len(word):
        return head + fits[0][:common], fits
    return head + word, fits
