"""The Chatbot Arena as a page of serve/server.py (arena.html at GET /arena), when it serves two or more
models: two of them, drawn at random, answer a typed prompt as "Model A" and "Model B"; the names
stay on the server until the vote, which is added to the battles file `evaluate.py ratings` reads.

Entry points: `Contestant`, `Arena` (open battles and votes) and `ROUTES` (POST /arena/battle,
POST /arena/vote, GET /arena/ratings), which serve/server.py mounts. The pairing, the battle record and
its writer are evals/arena.py's; the ratings are evals/ratings.py's.
"""
import collections
import random
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from serve.batching import Engine
from evals import ratings
from evals.arena import battle_record, pick_pair, record_battle
from serve.openai_api import ApiError, get, parse_request

PAGE = Path(__file__).with_name("arena.html")
MAX_OPEN = 1000  # battles remembered (open or voted); older ones are forgotten, oldest first


@dataclass
class Contestant:
    """One model in the arena: its name in the battle log and how to ask it."""
    name: str
    engine: Engine
    context_length: int
    style: str = "alpaca"


class Arena:
    """The battles handed out and their votes. One lock guards the pairing, the table of battles
    and the battles file, so that two votes never rewrite the file at once (one would be lost)
    and a battle takes one vote only."""

    def __init__(self, contestants: list[Contestant], battles_path, seed: int | None = None):
        if len(contestants) < 2:
            raise ValueError("the arena needs at least two models")
        self.contestants, self.battles_path = contestants, Path(battles_path)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.battles: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.page = PAGE.read_bytes()

    def pair(self) -> tuple[Contestant, Contestant]:
        """Two different contestants as (A, B); which one sits on side A is random too."""
        with self.lock:
            i, j = pick_pair(self.rng, len(self.contestants))
        return self.contestants[i], self.contestants[j]

    def open(self, a: Contestant, b: Contestant, entry: dict, answer_a: str,
             answer_b: str) -> str:
        """Remember a battle until its vote; returns its id (random, so none can be guessed)."""
        battle_id = uuid.uuid4().hex
        with self.lock:
            self.battles[battle_id] = {"model_a": a.name, "model_b": b.name, "entry": entry,
                                       "answer_a": answer_a, "answer_b": answer_b, "voted": False}
            while len(self.battles) > MAX_OPEN:
                self.battles.popitem(last=False)
        return battle_id

    def vote(self, battle_id: str, winner: str) -> dict:
        """Add the battle with its winner to the battles file and return its record; 404 for an
        unknown id, 409 for a second vote. A failed write leaves the battle open for a retry."""
        with self.lock:
            battle = self.battles.get(battle_id)
            if battle is None:
                raise ApiError(404, "no such battle (unknown, or too old: the server keeps the "
                                    f"last {MAX_OPEN})", "battle_id")
            if battle["voted"]:
                raise ApiError(409, "this battle already has its vote", "battle_id")
            record = battle_record(battle["model_a"], battle["model_b"], winner,
                                   battle["entry"], battle["answer_a"], battle["answer_b"])
            try:
                record_battle(self.battles_path, record)
            except OSError as e:
                raise ApiError(500, f"cannot add the vote to {self.battles_path}: "
                                    f"{e.strerror or e}") from None
            battle["voted"] = True
        return record


def arena_of(app):
    if app.arena is None:
        raise ApiError(404, "no arena: it needs two or more models (python serve/server.py A.pt B.pt)")
    return app.arena


def send_page(h, app) -> None:
    h.send_bytes(200, arena_of(app).page, "text/html; charset=utf-8")


def battle(h, app) -> None:
    """{"prompt", "temperature"?, "max_tokens"?, "seed"?} -> {"battle_id", "answer_a",
    "answer_b"}: both answers generated at once, each by its model's own engine."""
    arena, body = arena_of(app), h.read_json(app)
    prompt = get(body, "prompt", (str,), "")
    if not prompt.strip():
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
    a, b = arena.pair()
    # the same checks and prompt template as a chat request; greedy unless told otherwise
    options = {k: body[k] for k in ("temperature", "max_tokens", "seed") if body.get(k) is not None}
    chat = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, **options}
    requests = [parse_request(chat, True, app.tokenizer, c.context_length, c.style,
                              app.default_max_tokens, c.engine.device) for c in (a, b)]
    try:
        for c, request in zip((a, b), requests):
            h.submit(c.engine, request)
        # the engine's text is generate.py's answer before strip(); strip as generate_responses
        answers = [h.collect(request)[0].strip() for request in requests]
    finally:
        for request in requests:
            request.cancelled.set()  # a no-op once finished; frees the slot if we left early
    entry = {"instruction": prompt, "input": ""}
    h.send_json(200, {"battle_id": arena.open(a, b, entry, *answers), "answer_a": answers[0],
                      "answer_b": answers[1]})


def vote(h, app) -> None:
    """{"battle_id", "winner"} -> {"model_a", "model_b", "winner"}: the names, after the vote."""
    arena, body = arena_of(app), h.read_json(app)
    battle_id = get(body, "battle_id", (str,))
    if battle_id is None:
        raise ApiError(400, "'battle_id' is missing", "battle_id")
    winner = get(body, "winner", (str,))
    if winner not in ratings.WINNERS:
        raise ApiError(400, f"'winner' must be one of {', '.join(ratings.WINNERS)}", "winner")
    record = arena.vote(battle_id, winner)
    h.send_json(200, {k: record[k] for k in ("model_a", "model_b", "winner")})


def current_ratings(h, app) -> None:
    """Elo and Bradley–Terry over the whole battles file, as `evaluate.py ratings FILE
    --bootstrap 0` computes them (no intervals: a bootstrap would take too long per view)."""
    path = arena_of(app).battles_path
    try:
        battles = ratings.read_battles(path) if path.exists() else []
    except (OSError, ValueError) as e:
        raise ApiError(500, f"cannot read the battles: {e}") from None
    if not battles:
        h.send_json(200, {"battles": 0, "models": {}})
        return
    result = ratings.rate(battles, ratings.parse_args([str(path), "--bootstrap", "0", "--quiet"]))
    h.send_json(200, {"battles": len(battles), **result})


ROUTES = {
    "/arena": ("GET", send_page),
    "/arena/battle": ("POST", battle),
    "/arena/vote": ("POST", vote),
    "/arena/ratings": ("GET", current_ratings),
}
