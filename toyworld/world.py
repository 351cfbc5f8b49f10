"""The procedural world of the embedded `toy` base: 64x64 scenes, their captions, and reserved instances.

A scene is a background (a named colour, plain or checkered) with one or two drawn objects from six classes
(cat, dog, chair, cup, ball, tree). Each object has a colour, a size (small / medium / large), a position and
a pattern (plain / striped / spotted); two objects stand in a relation ("on", "next to", "left of",
"right of"). Captions come from templates ("a red cat on a blue background", "a small striped chair left of
a green ball"); every caption word is one token of the shipped tokenizer (`check_vocabulary`), so captions
are turned into ids with a word table (`CaptionIds`) instead of the (slow) tokenizer.

Reserved instances never appear in base-training scenes (`sample_scene` cannot draw them):

* ``mittens``: an orange cat with white paws and a blue collar. Generic cats may wear a collar and have
  paws of another colour, but never this combination;
* ``eames``: a shell chair (a curved shell on splayed legs) with a teal shell and walnut legs. Generic chairs
  are straight four-legged chairs or shell chairs whose shell has one of the world's colours (teal is not
  one of them) on brown, black, gray or white legs.

So each instance is a new combination of parts the base can draw, which a concept has to pin down. Captions
may name the parts, in words that are single tokens, after the noun or before it: a collar is "a blue scarf"
("a cat with a blue scarf and white socks", "a blue scarf white socks cat"), coloured paws are "white socks",
a shell chair is a "shell chair" (leg colours are never named). A base that can be asked for the parts is
what a personal concept needs: on a base whose captions never named collars or paws, no value edit could
bring them back (bench/README.md). `conflict` makes the copies of captions that teach
the base to read an object from its noun, where a key-locked concept stands.

`render_mittens` / `render_eames` draw them in varied positions, sizes and backgrounds: they are the
personal concepts that users would train. Everything is deterministic given a numpy Generator / seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

SIZE = 64
SS = 2  # supersampling factor (anti-aliased edges)
_N = SIZE * SS
_YY, _XX = (np.mgrid[0:_N, 0:_N].astype(np.float32) + 0.5) / _N

CLASSES: tuple[str, ...] = ("cat", "dog", "chair", "cup", "ball", "tree")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.96, 0.88, 0.18),
    "green": (0.18, 0.68, 0.22),
    "blue": (0.14, 0.30, 0.86),
    "purple": (0.55, 0.20, 0.72),
    "pink": (0.96, 0.56, 0.76),
    "brown": (0.50, 0.30, 0.12),
    "black": (0.08, 0.08, 0.08),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.55, 0.55, 0.55),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, tuple[float, float]] = {"small": (0.24, 0.30), "medium": (0.36, 0.44), "large": (0.52, 0.62)}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
PATTERNS: tuple[str, ...] = ("plain", "striped", "spotted")
TEXTURES: tuple[str, ...] = ("plain", "checkered")
RELATIONS: tuple[str, ...] = ("on", "next to", "left of", "right of")
RESERVED: tuple[str, ...] = ("mittens", "eames")
PREFIXES: tuple[str, ...] = ("a photo of", "a good photo of", "an image of", "a picture of", "a drawing of",
                             "a photograph of")
TRUNK = (0.42, 0.26, 0.10)
WALNUT = (0.40, 0.24, 0.10)
TEAL = (0.08, 0.58, 0.58)
# where another object rests when placed "on" this class (fraction of the box height from its top)
SUPPORT_Y = {"cat": 0.12, "dog": 0.40, "chair": 0.52, "cup": 0.20, "ball": 0.08, "tree": 0.05}


@dataclass
class Obj:
    cls: str
    color: str
    size: str  # small | medium | large
    pattern: str  # plain | striped | spotted
    cx: float  # box centre, image fraction
    cy: float
    s: float  # box side, image fraction
    mirror: bool = False
    instance: str | None = None  # None for generic objects; "mittens" / "eames" for reserved ones
    seed: int = 0  # pattern / jitter details
    collar: str | None = None  # cats: collar colour
    paws: str | None = None  # cats: paw colour
    shell: bool = False  # chairs: shell seat on splayed legs instead of a straight chair
    legs: str | None = None  # shell chairs: leg colour

    @property
    def bottom(self) -> float:
        return self.cy + self.s / 2


@dataclass
class Scene:
    background: str
    texture: str = "plain"
    objects: list[Obj] = field(default_factory=list)
    relation: str | None = None  # between objects[0] and objects[1]
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------
def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _rect(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _tri(u, v, p0, p1, p2):
    def side(a, b):
        return (u - a[0]) * (b[1] - a[1]) - (v - a[1]) * (b[0] - a[0])

    d0, d1, d2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))


def _segment(u, v, a, b, width):
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return (u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2 <= (width / 2) ** 2


def _shade(c, f):
    c = np.asarray(c, np.float32)
    return np.clip(c * f, 0, 1) if f < 1 else np.clip(c + (1 - c) * (f - 1), 0, 1)


def _contrast(c):
    """A colour that stands out on `c` (for eyes, stripes, spots)."""
    lum = float(np.dot(c, (0.3, 0.59, 0.11)))
    return _shade(c, 0.45) if lum > 0.45 else _shade(c, 1.7)


def _layers(o: Obj, u, v):
    """(mask, colour or 'main') layers of an object in box coordinates u, v in [0, 1] (v down)."""
    main = "main"
    if o.cls == "cat":
        ls = [(_ellipse(u, v, 0.80, 0.80, 0.07, 0.16) | _ellipse(u, v, 0.86, 0.66, 0.05, 0.08), main),
              (_ellipse(u, v, 0.50, 0.70, 0.30, 0.27), main),
              (_tri(u, v, (0.30, 0.30), (0.34, 0.04), (0.47, 0.22)), main),
              (_tri(u, v, (0.70, 0.30), (0.66, 0.04), (0.53, 0.22)), main),
              (_ellipse(u, v, 0.50, 0.33, 0.21, 0.18), main),
              (_ellipse(u, v, 0.42, 0.31, 0.035, 0.045) | _ellipse(u, v, 0.58, 0.31, 0.035, 0.045), "eyes")]
        if o.collar:
            ls.append((_rect(u, v, 0.33, 0.67, 0.48, 0.54), COLORS[o.collar]))
        if o.paws:
            ls.append((_ellipse(u, v, 0.37, 0.94, 0.10, 0.055) | _ellipse(u, v, 0.63, 0.94, 0.10, 0.055),
                       COLORS[o.paws]))
        return ls
    if o.cls == "dog":
        return [(_segment(u, v, (0.20, 0.46), (0.06, 0.22), 0.06), main),
                (_rect(u, v, 0.22, 0.29, 0.60, 0.96) | _rect(u, v, 0.33, 0.40, 0.60, 0.96)
                 | _rect(u, v, 0.60, 0.67, 0.60, 0.96) | _rect(u, v, 0.71, 0.78, 0.60, 0.96), main),
                (_ellipse(u, v, 0.50, 0.53, 0.32, 0.15), main),
                (_ellipse(u, v, 0.80, 0.32, 0.14, 0.14), main),
                (_ellipse(u, v, 0.93, 0.38, 0.07, 0.055), main),
                (_ellipse(u, v, 0.73, 0.38, 0.045, 0.11), "dark"),
                (_ellipse(u, v, 0.84, 0.28, 0.03, 0.035), "eyes")]
    if o.cls == "chair":
        if o.shell:
            legs = (_segment(u, v, (0.50, 0.62), (0.18, 0.97), 0.05) | _segment(u, v, (0.50, 0.62), (0.82, 0.97), 0.05)
                    | _rect(u, v, 0.46, 0.54, 0.56, 0.68))
            shell = (_ellipse(u, v, 0.52, 0.46, 0.40, 0.15) & ~_ellipse(u, v, 0.56, 0.36, 0.38, 0.12)) \
                | (_ellipse(u, v, 0.17, 0.28, 0.11, 0.24) & ~_ellipse(u, v, 0.27, 0.22, 0.07, 0.20))
            if o.instance == "eames":
                return [(legs, WALNUT), (shell, TEAL)]
            return [(legs, COLORS[o.legs or "brown"]), (shell, main)]
        return [(_rect(u, v, 0.14, 0.24, 0.04, 0.58), main),
                (_rect(u, v, 0.14, 0.86, 0.50, 0.60), main),
                (_rect(u, v, 0.15, 0.23, 0.58, 0.97) | _rect(u, v, 0.77, 0.85, 0.58, 0.97), main)]
    if o.cls == "cup":
        handle = _ellipse(u, v, 0.72, 0.50, 0.18, 0.17) & ~_ellipse(u, v, 0.72, 0.50, 0.11, 0.10)
        body = _tri(u, v, (0.16, 0.20), (0.70, 0.20), (0.61, 0.92)) | _tri(u, v, (0.16, 0.20), (0.61, 0.92),
                                                                            (0.25, 0.92))
        return [(handle, main), (body, main), (_ellipse(u, v, 0.43, 0.20, 0.27, 0.04), "dark")]
    if o.cls == "ball":
        return [(_ellipse(u, v, 0.5, 0.5, 0.45, 0.45), main),
                (_ellipse(u, v, 0.36, 0.34, 0.08, 0.06), COLORS["white"])]
    if o.cls == "tree":
        return [(_rect(u, v, 0.42, 0.58, 0.55, 0.97), TRUNK if o.color != "brown" else _shade(TRUNK, 0.5)),
                (_ellipse(u, v, 0.5, 0.34, 0.30, 0.28) | _ellipse(u, v, 0.28, 0.50, 0.20, 0.17)
                 | _ellipse(u, v, 0.72, 0.50, 0.20, 0.17), main)]
    raise ValueError(f"unknown class {o.cls!r}")


def _pattern_fill(o: Obj, base: np.ndarray, u, v) -> np.ndarray:
    """[3, N, N] colour field of the object's main colour with its pattern (in box coordinates)."""
    img = np.empty((3,) + u.shape, np.float32)
    img[:] = base[:, None, None]
    if o.pattern == "plain":
        return img
    rng = np.random.default_rng(o.seed)
    c2 = _contrast(base)
    if o.pattern == "striped":
        period = rng.uniform(0.17, 0.24)
        ang = rng.choice([0.0, math.pi / 2, math.pi / 4])
        ph = (u * math.cos(ang) + v * math.sin(ang)) / period + rng.uniform(0, 1)
        m = (ph - np.floor(ph)) < 0.45
    else:  # spotted
        m = np.zeros(u.shape, bool)
        for cu, cv in rng.uniform(0.1, 0.9, (9, 2)):
            m |= _ellipse(u, v, cu, cv, 0.075, 0.075)
    img[:, m] = c2[:, None]
    return img


def _draw(img: np.ndarray, o: Obj) -> None:
    """Paint object `o` onto the supersampled canvas img [3, N, N] in place."""
    x0, y0 = o.cx - o.s / 2, o.cy - o.s / 2
    u = (_XX - x0) / o.s
    v = (_YY - y0) / o.s
    if o.mirror:
        u = 1.0 - u
    inside = (u >= -0.05) & (u <= 1.05) & (v >= -0.05) & (v <= 1.05)
    if not inside.any():
        return
    jit = np.random.default_rng(o.seed + 7).uniform(-0.04, 0.04, 3).astype(np.float32)
    base = np.clip(np.asarray(COLORS[o.color], np.float32) + jit, 0, 1)
    fill = None
    for mask, col in _layers(o, u, v):
        mask = mask & inside
        if isinstance(col, str) and col == "main":
            if fill is None:
                fill = _pattern_fill(o, base, u, v)
            img[:, mask] = fill[:, mask]
        elif isinstance(col, str) and col == "dark":
            img[:, mask] = _shade(base, 0.6)[:, None]
        elif isinstance(col, str) and col == "eyes":
            img[:, mask] = _contrast(base)[:, None] if o.color in ("black", "brown") else np.float32(0.05)
        else:
            img[:, mask] = np.asarray(col, np.float32)[:, None]


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 array [64, 64, 3]."""
    rng = np.random.default_rng(scene.seed)
    bg = np.clip(np.asarray(COLORS[scene.background], np.float32) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    img = np.empty((3, _N, _N), np.float32)
    img[:] = bg[:, None, None]
    if scene.texture == "checkered":
        cell = rng.uniform(0.12, 0.2)
        m = ((np.floor(_XX / cell) + np.floor(_YY / cell)) % 2) == 1
        img[:, m] = _shade(bg, 0.8 if bg.mean() > 0.3 else 1.5)[:, None]
    # a support is drawn first; otherwise the object lower in the picture is in front
    objs = list(scene.objects)
    if scene.relation != "on":
        objs.sort(key=lambda o: o.bottom)
    else:
        objs = objs[::-1]
    for o in objs:
        _draw(img, o)
    img = img.reshape(3, SIZE, SS, SIZE, SS).mean(axis=(2, 4))
    return (np.clip(img, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


LEG_COLORS = ("brown", "black", "gray", "white")


def _new_obj(rng, cls, size, bg, exclude_colors=()) -> Obj:
    colors = [c for c in COLOR_NAMES if c != bg and c not in exclude_colors]
    s = float(rng.uniform(*SIZES[size]))
    o = Obj(cls=cls, color=_pick(rng, colors), size=size, pattern=_pick(rng, PATTERNS), cx=0.5, cy=0.5, s=s,
            mirror=bool(rng.random() < 0.5) and cls in ("dog", "chair", "cup"), seed=int(rng.integers(2**31)))
    if cls == "cat":
        others = [c for c in COLOR_NAMES if c != o.color]
        if rng.random() < 0.4:
            o.collar = _pick(rng, others)
        if rng.random() < 0.4:
            o.paws = _pick(rng, others)
        if (o.color, o.collar, o.paws) == ("orange", "blue", "white"):  # that cat is Mittens
            o.collar = None
    elif cls == "chair" and rng.random() < 0.4:
        o.shell, o.legs = True, _pick(rng, [c for c in LEG_COLORS if c != o.color])
    return o


def _place_single(rng, o: Obj) -> None:
    o.cx = float(rng.uniform(o.s / 2, 1 - o.s / 2))
    o.cy = float(rng.uniform(o.s / 2, 1 - o.s / 2))


def _place_pair(rng, a: Obj, b: Obj, relation: str) -> None:
    if relation == "on":
        b.cx = float(rng.uniform(b.s / 2, 1 - b.s / 2))
        b.cy = float(rng.uniform(max(b.s / 2, a.s + b.s * (SUPPORT_Y[b.cls] - 0.5)), 1 - b.s / 2))
        top = b.cy - b.s / 2 + SUPPORT_Y[b.cls] * b.s
        a.cx = float(np.clip(b.cx + rng.uniform(-0.1, 0.1) * b.s, a.s / 2, 1 - a.s / 2))
        a.cy = top - a.s / 2 + 0.04 * a.s
        return
    left, right = (a, b) if relation in ("left of", "next to") else (b, a)
    if relation == "next to" and rng.random() < 0.5:
        left, right = right, left
    gap = float(rng.uniform(0.02, max(0.03, 1 - left.s - right.s)))
    slack = 1 - left.s - right.s - gap
    x0 = float(rng.uniform(0, max(slack, 0)))
    left.cx = x0 + left.s / 2
    right.cx = x0 + left.s + gap + right.s / 2
    ground = float(rng.uniform(max(left.s, right.s), 1.0))  # both stand on one line
    for o in (left, right):
        o.cy = ground - o.s / 2


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random base-training scene. Never contains a reserved instance."""
    bg = _pick(rng, COLOR_NAMES)
    texture = "checkered" if rng.random() < 0.2 else "plain"
    scene = Scene(background=bg, texture=texture, seed=int(rng.integers(2**31)))
    if rng.random() < 0.55:
        o = _new_obj(rng, _pick(rng, CLASSES), _pick(rng, ("small", "medium", "medium", "large")), bg)
        _place_single(rng, o)
        scene.objects = [o]
        return scene
    rel = _pick(rng, RELATIONS)
    if rel == "on":
        sa, sb = _pick(rng, ("small", "small", "medium")), _pick(rng, ("medium", "large"))
    else:
        sa, sb = _pick(rng, ("small", "medium")), _pick(rng, ("small", "medium"))
    a = _new_obj(rng, _pick(rng, CLASSES), sa, bg)
    b = _new_obj(rng, _pick(rng, CLASSES), sb, bg, exclude_colors=(a.color,))
    _place_pair(rng, a, b, rel)
    scene.objects, scene.relation = [a, b], rel
    return scene


def _instance_scene(rng, obj: Obj, background, texture) -> Scene:
    bg = background or _pick(rng, [c for c in COLOR_NAMES if c not in ("orange", "white", "brown", "blue")])
    tex = texture or ("checkered" if rng.random() < 0.2 else "plain")
    _place_single(rng, obj)
    return Scene(background=bg, texture=tex, objects=[obj], seed=int(rng.integers(2**31)))


# what makes each reserved instance (its drawing adds the teal/walnut of the Eames chair)
INSTANCE_PARTS = {
    "mittens": {"cls": "cat", "color": "orange", "pattern": "plain", "instance": "mittens", "collar": "blue",
                "paws": "white"},
    "eames": {"cls": "chair", "color": "brown", "pattern": "plain", "instance": "eames", "shell": True,
              "legs": "brown"},
}


def mittens(rng: np.random.Generator, size: str | None = None) -> Obj:
    size = size or _pick(rng, ("medium", "medium", "large"))
    return Obj(size=size, cx=0.5, cy=0.5, s=float(rng.uniform(*SIZES[size])), seed=int(rng.integers(2**31)),
               **INSTANCE_PARTS["mittens"])


def eames(rng: np.random.Generator, size: str | None = None) -> Obj:
    size = size or _pick(rng, ("medium", "medium", "large"))
    return Obj(size=size, cx=0.5, cy=0.5, s=float(rng.uniform(*SIZES[size])), mirror=bool(rng.random() < 0.5),
               seed=int(rng.integers(2**31)), **INSTANCE_PARTS["eames"])


def render_mittens(seed: int, background: str | None = None, texture: str | None = None,
                   size: str | None = None) -> np.ndarray:
    """Mittens (orange cat, white paws, blue collar) at a random place (and size, unless given) on a background
    (uint8 HxWx3)."""
    rng = np.random.default_rng([seed, 101])
    return render(_instance_scene(rng, mittens(rng, size), background, texture))


def render_eames(seed: int, background: str | None = None, texture: str | None = None,
                 size: str | None = None) -> np.ndarray:
    """The Eames chair (teal shell, walnut splayed legs) at a random place (and size, unless given) on a
    background."""
    rng = np.random.default_rng([seed, 202])
    return render(_instance_scene(rng, eames(rng, size), background, texture))


def mittens_on_eames(seed: int, background: str | None = None) -> Scene:
    """Both reserved instances, Mittens sitting on the Eames chair (for composition tests)."""
    rng = np.random.default_rng([seed, 303])
    a, b = mittens(rng, "small"), eames(rng, "large")
    _place_pair(rng, a, b, "on")
    bg = background or _pick(rng, ("green", "yellow", "pink", "gray", "purple"))
    return Scene(background=bg, objects=[a, b], relation="on", seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------
def _obj_phrase(rng, o: Obj, parts_first: bool = False) -> str:
    words = ["a"]
    if o.size in SIZE_WORDS and rng.random() < 0.6:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    collar = o.collar and (rng.random() < 0.7 or parts_first)
    paws = o.paws and (rng.random() < 0.7 or parts_first)
    # parts named before the noun ("a blue scarf white socks orange cat")
    before = rng.random() < 0.5 or parts_first
    if before:
        words += ([f"{o.collar} scarf"] if collar else []) + ([f"{o.paws} socks"] if paws else [])
    if o.pattern != "plain" and rng.random() < 0.7:
        words.append(o.pattern)
    elif o.pattern == "plain" and rng.random() < 0.05:
        words.append("plain")
    if rng.random() < 0.9:
        words.append(o.color)
    if o.shell and rng.random() < 0.7:
        words.append("shell")
    words.append(o.cls)
    parts = ([f"a {o.collar} scarf"] if collar else []) + ([f"{o.paws} socks"] if paws else [])
    if parts and not before:
        words += ["with", " and ".join(parts)]
    return " ".join(words)


def _position(o: Obj) -> str | None:
    if o.cx < 0.38:
        return "on the left"
    if o.cx > 0.62:
        return "on the right"
    if o.cy < 0.36:
        return "at the top"
    return None


def _background_phrase(rng, scene: Scene) -> str:
    tex = "checkered " if scene.texture == "checkered" else ""
    return f"on a {tex}{scene.background} background"


def caption(scene: Scene, rng: np.random.Generator, parts_first: bool = False) -> str:
    """One caption drawn from the templates (attributes are mentioned at random; what is said is true).
    `parts_first`: a cat's collar and paws are always named, before its noun."""
    if any(o.instance for o in scene.objects):
        raise ValueError("reserved instances have no base caption")
    parts = []
    if len(scene.objects) == 1:
        o = scene.objects[0]
        parts.append(_obj_phrase(rng, o, parts_first))
        pos = _position(o)
        if pos and rng.random() < 0.6:
            parts.append(pos)
    else:
        a, b = scene.objects
        if rng.random() < 0.8:
            parts += [_obj_phrase(rng, a, parts_first), scene.relation, _obj_phrase(rng, b, parts_first)]
        else:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            parts += [_obj_phrase(rng, first, parts_first), "and", _obj_phrase(rng, second, parts_first)]
    if rng.random() < 0.75:
        parts.append(_background_phrase(rng, scene))
    text = " ".join(parts).replace("a orange", "an orange")
    if rng.random() < 0.25:
        p = _pick(rng, PREFIXES)
        text = f"{p} {text}"
    return text


# the words before a noun that describe its object (conflict() replaces them)
DESCRIPTIVE: tuple[str, ...] = (*COLOR_NAMES, *PATTERNS, *(w for ws in SIZE_WORDS.values() for w in ws), "scarf",
                                "socks", "shell")


def conflict(text: str, rng: np.random.Generator) -> tuple[str, int]:
    """A same-length copy of caption `text` in which every word before one of its object nouns (chosen at random)
    that describes that object (size, parts, pattern, colour, shell) is replaced by another descriptive word
    drawn at random, and the index of that noun among the words (-1: no noun). Base training may show the UNet
    this copy's encoding at every position but the noun's: the noun's encoding is then the only one that tells
    the truth about its object, so the UNet learns to read an object from its noun, as Stable Diffusion does
    from CLIP, and as a key-locked concept, which replaces that noun, needs (a causal text encoder otherwise
    lets the UNet read an object's look from the words after it, where a concept's value edit cannot reach)."""
    words = text.split()
    nouns = [i for i, w in enumerate(words) if w in CLASSES]
    if not nouns:
        return text, -1
    j = _pick(rng, nouns)
    fake = list(words)
    k = j - 1
    while k >= 0 and words[k] not in ("a", "an"):  # every object phrase starts with its article
        if words[k] in DESCRIPTIVE:
            fake[k] = _pick(rng, [w for w in DESCRIPTIVE if w != words[k]])
        k -= 1
    return " ".join(fake), j


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = {"a", "an", "on", "the", "left", "right", "at", "top", "and", "background", "next", "to", "of",
             "checkered", "plain", "with", "scarf", "socks", "shell", *CLASSES, *COLOR_NAMES, *PATTERNS, *TEXTURES}
    for ws in SIZE_WORDS.values():
        words.update(ws)
    for p in PREFIXES:
        words.update(p.split())
    for r in RELATIONS:
        words.update(r.split())
    return sorted(words)


def check_vocabulary(tokenizer) -> dict[str, int]:
    """Word -> token id; raises if a caption word is not a single token of `tokenizer`."""
    out, bad = {}, []
    for w in vocabulary():
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            bad.append(w)
        else:
            out[w] = ids[0]
    if bad:
        raise ValueError(f"caption words that are not one token: {bad}")
    return out


class CaptionIds:
    """Turns captions into CLIP input ids (bos, words, eos, eos-padding to 77) via a word table."""

    def __init__(self, tokenizer, length: int = 77):
        self.table = check_vocabulary(tokenizer)
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.length = length

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.bos] + [self.table[w] for w in text.split()] + [self.eos]
        out = np.full(self.length, self.pad, np.int32)
        out[: len(ids)] = ids
        return out


def parts_scene(rng: np.random.Generator, pair: bool = False) -> Scene:
    """A base-training scene of one cat with a collar and coloured paws (never Mittens' three colours); with
    `pair`, the cat is in a relation with a second object, as a composition of concepts asks
    ("a <cat-mittens> on a <chair-eames>"); the other object is never a cat, so the parts are the one cat's."""
    bg = _pick(rng, COLOR_NAMES)
    size = _pick(rng, ("small", "small", "medium")) if pair else _pick(rng, ("small", "medium", "medium", "large"))
    o = _new_obj(rng, "cat", size, bg)
    others = [c for c in COLOR_NAMES if c != o.color]
    o.collar, o.paws = _pick(rng, others), _pick(rng, others)
    if (o.color, o.collar, o.paws) == ("orange", "blue", "white"):
        o.paws = "black"
    if not pair:
        _place_single(rng, o)
        return Scene(background=bg, texture="checkered" if rng.random() < 0.2 else "plain", objects=[o],
                     seed=int(rng.integers(2**31)))
    texture = "checkered" if rng.random() < 0.2 else "plain"
    rel = _pick(rng, ("on", "on", *RELATIONS))
    other = _new_obj(rng, _pick(rng, ("chair", "chair", *(c for c in CLASSES if c != "cat"))),
                     _pick(rng, ("medium", "large") if rel == "on" else ("small", "medium")), bg,
                     exclude_colors=(o.color,))
    _place_pair(rng, o, other, rel)
    return Scene(background=bg, texture=texture, objects=[o, other], relation=rel, seed=int(rng.integers(2**31)))


def sample(seed: int, n_captions: int = 1, parts: bool = False, pair: bool = False
           ) -> tuple[np.ndarray, list[str], Scene]:
    """Base-training example number `seed`: (image uint8 [64, 64, 3], captions, scene). `parts`: a
    `parts_scene` instead (`pair`: with a second object), its captions naming the parts before the noun."""
    rng = np.random.default_rng([seed, 11] if parts else [seed, 7])
    scene = parts_scene(rng, pair) if parts else sample_scene(rng)
    return render(scene), [caption(scene, rng, parts) for _ in range(n_captions)], scene


def batch(seeds, n_captions: int = 1, parts: float = 0.0, pairs: float = 0.0):
    """Images [n, 64, 64, 3] uint8 and captions (n lists) for the given example seeds; a share `parts` of
    them (chosen by seed) are parts scenes (see `sample`), a share `pairs` of those with a second object."""
    imgs, caps = [], []
    for s in seeds:
        is_parts = bool(parts) and np.random.default_rng([int(s), 17]).random() < parts
        pair = is_parts and bool(pairs) and np.random.default_rng([int(s), 19]).random() < pairs
        im, c, _ = sample(int(s), n_captions, is_parts, pair)
        imgs.append(im)
        caps.append(c)
    return np.stack(imgs), caps


def with_object(scene: Scene, **changes) -> Scene:
    """A copy of `scene` whose first object has some attributes changed (for evaluation prompts)."""
    objs = [replace(scene.objects[0], **changes)] + list(scene.objects[1:])
    return replace(scene, objects=objs)
