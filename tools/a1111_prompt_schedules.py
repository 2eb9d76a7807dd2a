"""Goldens for A1111 prompt editing and alternation (sd_core::prompt_schedule).

A1111 parses prompts with a Lark grammar (modules/prompt_parser.py of AUTOMATIC1111/stable-diffusion-webui,
v1.6+); ambiguities and parse failures are decided by Lark's Earley parser, which a hand-written parser must
reproduce. This script parses each case with that grammar through the real `lark` package (PyPI) and writes
the schedule A1111 derives from the tree (its default, non-"old" scheduling) to
fixtures/prompts/a1111_schedules.json. Run: python tools/a1111_prompt_schedules.py (needs `pip install lark`).
"""
import json
import os

import lark

# The grammar as A1111 ships it (the syntax being specified, not an implementation).
GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
PARSER = lark.Lark(GRAMMAR)


def when_step(text, steps, int_offset, flt_offset):
    v = float(text)
    v = (v - flt_offset) * steps if "." in text else v - int_offset
    return min(steps, int(v))


def render(node, step, steps, offsets):
    """The text of a parse (sub)tree at `step`."""
    if isinstance(node, lark.Token):
        return node.value
    if node is None:
        return ""
    if node.data == "scheduled":
        before, after, _, when, _ = node.children
        w = when_step(when.value, steps, *offsets)
        return render(before, step, steps, offsets) if step <= w else render(after, step, steps, offsets)
    if node.data == "alternate":
        options = node.children
        return render(options[(step - 1) % len(options)], step, steps, offsets)
    return "".join(render(c, step, steps, offsets) for c in node.children)


def schedule(prompt, base_steps, hires_steps=None):
    if hires_steps is None:
        steps, offsets = base_steps, (0, 0)
    else:
        steps, offsets = hires_steps, (base_steps, 1.0)
    try:
        tree = PARSER.parse(prompt)
    except lark.exceptions.LarkError:
        return [[steps, prompt]]
    ends = {steps}
    for sub in tree.iter_subtrees():
        if sub.data == "scheduled":
            w = when_step(sub.children[-2].value, steps, *offsets)
            if w >= 1:
                ends.add(w)
        elif sub.data == "alternate":
            ends.update(range(1, steps + 1))
    return [[t, render(tree, t, steps, offsets)] for t in sorted(ends)]


CASES = [
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]", 100, None),
    ("a [cat:dog:5] on a [red|green|blue] mat", 12, None),
    ("[a:b:0]", 10, None),
    ("[a:b:-2]", 10, None),
    ("[a:b:1e1]", 10, None),
    ("[a:b:1.5e-1]", 20, None),
    ("[a:b:+3]", 10, None),
    ("[a:b:30]", 10, None),
    ("[a:b: 4 ]", 10, None),
    ("[a:b:4 ]", 10, None),
    ("[a :b :4]", 10, None),
    ("[a:b:c]", 10, None),
    ("[a:b:c:3]", 10, None),
    ("[a:(b:1.2):3]", 10, None),
    ("([a:b:3]:1.3) and (c)", 10, None),
    ("[(a:1.1)|b|[c|d]]", 6, None),
    ("[a|b] [c|d|e]", 7, None),
    ("[|a]", 4, None),
    ("[a|]", 4, None),
    ("a | b", 10, None),
    ("[a|b", 10, None),
    ("a|b]", 10, None),
    ("text\\", 10, None),
    ("\\[a:b:3\\]", 10, None),
    ("[\\:a:b:3]", 10, None),
    ("[a:b:3]]", 10, None),
    ("[[a:b:3]", 10, None),
    ("((a:b:3))", 10, None),
    ("(a:1.2:3)", 10, None),
    ("[a:b:.5] BREAK [c:d:0.25]", 8, None),
    ("[a:[b:c:0.5]:0.25]", 8, None),
    ("[[a|b]:c:3]", 6, None),
    ("[:x:3]", 10, None),
    ("[x::3]", 10, None),
    ("[:3]", 10, None),
    ("[::3]", 10, None),
    ("[a:b:3.]", 10, None),
    ("[a:b:1.]", 10, None),
    ("[a:b:.]", 10, None),
    ("[a:b:5]", 10, 10),
    ("[a:b:15]", 10, 10),
    ("[a:b:1.25]", 10, 8),
    ("[a|b]", 10, 4),
    ("über [schön:hässlich:0.5] ✨", 6, None),
    ("((a][:b:c [d:3]", 10, None),
    ("a: b: c", 10, None),
    ("[a:b:3] :", 10, None),
    ("[ a : b : 3 ]", 10, None),
    ("[a\tb:c\nd:2]", 10, None),
]


def random_cases(n, seed=1234):
    """Short random strings over the syntax's characters: where a hand-written parser and Earley differ."""
    import random

    rng = random.Random(seed)
    alphabet = "ab[]():|2.5 \\"
    seen, out = set(), []
    while len(out) < n:
        p = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        if p not in seen:
            seen.add(p)
            out.append((p, 4, None))
    return out


def structured_cases(n, seed=99):
    """Random nestings of the constructs, a third of them with one character inserted or deleted."""
    import random

    rng = random.Random(seed)
    numbers = ["1", "2", "3", "0.5", ".25", "1.", " 2 ", "-1", "7"]

    def gen(depth):
        if depth > 3 or rng.random() < 0.3:
            return rng.choice(["a", "b c", "", " d", "e "])
        k = rng.randrange(6)
        x, y = gen(depth + 1), gen(depth + 1)
        if k == 0:
            return f"[{x}:{y}:{rng.choice(numbers)}]"
        if k == 1:
            return f"[{y}:{rng.choice(numbers)}]"
        if k == 2:
            return "[" + "|".join(gen(depth + 1) for _ in range(rng.randint(2, 3))) + "]"
        if k == 3:
            return f"({x}:1.2)"
        if k == 4:
            return f"[{x}]"
        return x + y

    seen, out = set(), []
    while len(out) < n:
        p = gen(0) + gen(0)
        if rng.random() < 0.33 and p:
            i = rng.randrange(len(p))
            p = p[:i] + p[i + 1:] if rng.random() < 0.5 else p[:i] + rng.choice("[]():|") + p[i:]
        if p not in seen:
            seen.add(p)
            out.append((p, rng.choice([3, 4, 5]), None))
    return out


def adjacency_cases():
    """Editing constructs next to runs of stray characters, where Earley's choice between readings shows."""
    import itertools

    heads = ["[a:1]", "([a:1])", "[b:[a:1]]", "[a:1][b:2]", "x[a:b:1]", "[a|b]"]
    tails = ["".join(t) for n in range(1, 4) for t in itertools.product(":])(", repeat=n)]
    out = [(h + t, 3, None) for h in heads for t in tails[:40]]
    out += [(t + "[a:1]", 3, None) for t in tails[:20]]
    return out


def main():
    cases = CASES + random_cases(200) + structured_cases(300) + adjacency_cases()
    out = [{"prompt": p, "base_steps": b, "hires_steps": h, "schedule": schedule(p, b, h)} for p, b, h in cases]
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "prompts", "a1111_schedules.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"lark": lark.__version__, "cases": out}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} cases to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
