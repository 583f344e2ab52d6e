"""The words of make_dataset.py's data sets: tables written for this project, and the English
rules that inflect them (plural, past tense, comparative, numbers in words).

The two belong together: the tables hold only words the rules get right (no verb that doubles its
last letter, adjectives of one syllable or two ending in -y / -le), so a row needs no exception.
Stdlib only. make_dataset.py imports every name it uses from here, and other scripts (tiny_corpus.py,
benchmarks/tiny_families.py) reach them through make_dataset, as before this file was split off.
"""


def pairs(text: str) -> list[tuple[str, str]]:
    """"hot:cold, big:small" -> [("hot", "cold"), ("big", "small")]"""
    return [tuple(p.strip().split(":")) for p in text.split(",")]


# ---- tables: written for this project -------------------------------------------------------------
ANTONYMS = pairs(
    "hot:cold, big:small, happy:sad, fast:slow, tall:short, open:closed, light:dark, full:empty, "
    "up:down, early:late, rich:poor, strong:weak, hard:soft, wet:dry, young:old, loud:quiet, "
    "clean:dirty, thick:thin, sweet:sour, day:night, buy:sell, push:pull, win:lose, always:never, "
    "first:last, inside:outside, true:false, love:hate, begin:end, arrive:leave, give:take, "
    "remember:forget, friend:enemy, north:south, east:west, question:answer, before:after, "
    "above:below, wide:narrow, cheap:expensive, safe:dangerous, easy:difficult, smooth:rough, "
    "shallow:deep, polite:rude, asleep:awake, ancient:modern")
SYNONYMS = pairs(
    "large:big, tiny:small, quick:fast, glad:happy, start:begin, finish:end, shut:close, "
    "gift:present, simple:easy, stone:rock, ill:sick, clever:smart, centre:middle, chilly:cold, "
    "damp:wet, silent:quiet, enormous:huge, unhappy:sad, shout:yell, sofa:couch, wealthy:rich, "
    "correct:right, grin:smile, infant:baby, street:road, jog:run, purchase:buy, halt:stop, "
    "rapid:quick, frightened:scared, neat:tidy, tale:story, sleepy:tired, pretty:beautiful, "
    "occupation:job, mend:fix, leap:jump, reply:answer")
CAPITALS = pairs(
    "France:Paris, Germany:Berlin, Italy:Rome, Spain:Madrid, Portugal:Lisbon, Japan:Tokyo, "
    "China:Beijing, Russia:Moscow, Egypt:Cairo, Greece:Athens, Canada:Ottawa, Mexico:Mexico City, "
    "Argentina:Buenos Aires, Peru:Lima, Chile:Santiago, Australia:Canberra, New Zealand:Wellington, "
    "India:New Delhi, Ireland:Dublin, Norway:Oslo, Sweden:Stockholm, Finland:Helsinki, "
    "Denmark:Copenhagen, Poland:Warsaw, Austria:Vienna, Hungary:Budapest, Belgium:Brussels, "
    "Turkey:Ankara, Iran:Tehran, Iraq:Baghdad, Saudi Arabia:Riyadh, Thailand:Bangkok, Vietnam:Hanoi, "
    "South Korea:Seoul, Kenya:Nairobi, Ghana:Accra, Morocco:Rabat, Ethiopia:Addis Ababa, Cuba:Havana, "
    "Iceland:Reykjavik, Ukraine:Kyiv, Romania:Bucharest, Bulgaria:Sofia, Croatia:Zagreb, "
    "Nepal:Kathmandu")
LANGUAGES = pairs(
    "France:French, Germany:German, Italy:Italian, Spain:Spanish, Portugal:Portuguese, "
    "Brazil:Portuguese, Mexico:Spanish, Argentina:Spanish, Japan:Japanese, Russia:Russian, "
    "Greece:Greek, Turkey:Turkish, Poland:Polish, Sweden:Swedish, Norway:Norwegian, Denmark:Danish, "
    "Hungary:Hungarian, Egypt:Arabic, Saudi Arabia:Arabic, Thailand:Thai, Vietnam:Vietnamese, "
    "South Korea:Korean, Iran:Persian, Ukraine:Ukrainian, Romania:Romanian, Iceland:Icelandic, "
    "Austria:German, Chile:Spanish, Cuba:Spanish, Australia:English, China:Chinese, "
    "Croatia:Croatian, Bulgaria:Bulgarian")
ANIMAL_SOUNDS = pairs(
    "dog:woof, cat:meow, cow:moo, sheep:baa, pig:oink, duck:quack, horse:neigh, lion:roar, owl:hoot, "
    "snake:hiss, bee:buzz, frog:croak, mouse:squeak, rooster:cock-a-doodle-doo, donkey:hee-haw, "
    "wolf:howl, goat:maa, dove:coo, crow:caw, turkey:gobble, bear:growl, goose:honk, chick:cheep, "
    "cricket:chirp, hen:cluck, small bird:tweet")
COLOURS = pairs(
    "the sky:blue, grass:green, snow:white, a banana:yellow, coal:black, a ripe tomato:red, "
    "a carrot:orange, milk:white, a lemon:yellow, a lime:green, a strawberry:red, an emerald:green, "
    "a ruby:red, a sapphire:blue, chocolate:brown, a crow:black, a polar bear:white, "
    "a flamingo:pink, a plum:purple, a pumpkin:orange, blood:red, a fire engine:red, a pea:green, "
    "a cherry:red, an elephant:grey, soot:black, a zebra:black and white, salt:white, "
    "a tree trunk:brown, coffee:brown, a canary:yellow, a swan:white, a raven:black, "
    "a panda:black and white, the yolk of an egg:yellow")
BABY_ANIMALS = pairs(
    "dog:puppy, cat:kitten, cow:calf, sheep:lamb, horse:foal, goat:kid, duck:duckling, frog:tadpole, "
    "kangaroo:joey, bear:cub, lion:cub, tiger:cub, pig:piglet, chicken:chick, goose:gosling, "
    "swan:cygnet, deer:fawn, owl:owlet, eagle:eaglet, elephant:calf, whale:calf, seal:pup, wolf:pup")
CATEGORIES = [  # (singular, plural, members): disjoint groups; members take "a"/"an" by first letter
    ("fruit", "fruits", "apple banana cherry grape lemon mango peach pear plum melon apricot"),
    ("vegetable", "vegetables", "carrot potato onion cabbage lettuce leek turnip radish pea"),
    ("animal", "animals", "tiger rabbit horse elephant giraffe zebra monkey camel wolf"),
    ("vehicle", "vehicles", "car bus truck bicycle train tractor motorcycle van scooter tram"),
    ("musical instrument", "musical instruments", "piano violin guitar drum flute trumpet harp cello"),
    ("piece of furniture", "pieces of furniture", "chair table sofa bed desk wardrobe bookcase stool"),
    ("tool", "tools", "hammer saw drill wrench screwdriver chisel shovel rake axe"),
    ("piece of clothing", "pieces of clothing", "shirt jacket dress skirt coat scarf sweater glove"),
    ("part of the body", "parts of the body", "elbow knee shoulder ankle wrist finger nose ear chin"),
]
NOUNS = ("fox box bus glass dish brush church watch bench lunch wish class kiss dress city baby story "
         "lady party berry fly cherry puppy country key boy day toy monkey cat dog book tree car house "
         "apple bird chair pen cup table river lamp door window star girl flower road shoe coat hat bell "
         "ship cake ball map").split()
VERBS = ("walk talk jump play stay enjoy cook clean help open paint wash watch fix climb laugh look call "
         "listen visit answer finish start want need ask kick pull push rain learn dance smile bake close "
         "like love move live hope use change arrive decide carry cry try study hurry worry copy reply fry "
         "dry tidy").split()  # no verbs that double their last letter (stop -> stopped)
ADJECTIVES = ("tall short long small fast slow old young cold warm dark soft hard loud quiet rich poor "
              "high low deep kind clean bright sharp sweet strong weak thick cheap late wide large safe "
              "brave nice cute rare happy easy busy funny heavy early noisy lucky big hot thin fat wet sad "
              "flat slim gentle simple").split()  # one syllable, or two ending in -y / -le
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
UNITS = [("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
         ("litres", "millilitres", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("days", "hours", 24), ("weeks", "days", 7), ("years", "months", 12), ("feet", "inches", 12)]
# a small grammar for the sentences that are counted, reversed or uppercased
SUBJECTS = ("the dog", "my sister", "a small bird", "the old man", "our teacher", "the children",
            "a young girl", "his brother", "the farmer", "the cat")
PAST_VERBS = ("found", "painted", "watched", "carried", "opened", "liked", "cleaned", "saw", "lost", "made")
OBJECTS = ("a red ball", "the door", "the old car", "a new book", "the garden", "a green apple",
           "the window", "a big box", "the letter", "a warm coat")
ENDINGS = ("", "today", "yesterday", "in the park", "at home", "after lunch", "very slowly",
           "this morning", "again", "near the river")
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
VOWELS = "aeiou"


# ---- rules: one word in, one word out ------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[0].lower() in VOWELS else "a"


def capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def past_tense(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in VOWELS:
        return verb[:-1] + "ied"
    return verb + "ed"


def comparative(adj: str) -> str:
    """nice -> nicer, happy -> happier, big -> bigger, tall -> taller."""
    if adj.endswith("e"):
        return adj + "r"
    if adj.endswith("y") and adj[-2] not in VOWELS:
        return adj[:-1] + "ier"
    if adj[-1] not in VOWELS + "wxy" and adj[-2] in VOWELS and adj[-3] not in VOWELS:
        return adj + adj[-1] + "er"  # consonant-vowel-consonant doubles its last letter
    return adj + "er"


def number_words(n: int) -> str:
    """0..99 in words: 42 -> "forty-two"."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("-" + ONES[ones] if ones else "")
