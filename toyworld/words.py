"""The project's own word lists (written for perfusion-hub; no external source).

They feed three things:

* the caption corpus (`toyworld.corpus`) used to estimate the text-encoding covariance C;
* the embedded `toy` base's tokenizer (`toyworld.tokenizer`), whose merges make every word
  below (and every word of the corpus) exactly one token, so any noun can serve as a superclass there;
* tests and samples that need superclass words.

Every entry is a plain lowercase ASCII word (letters only). Lists are plain tuples in a fixed order, so
everything derived from them is deterministic. ``NOUNS`` maps a category to its nouns; a noun appears in
exactly one category (``_check`` guards it).
"""

from __future__ import annotations

import re

NOUNS: dict[str, tuple[str, ...]] = {
    "animals": (
        "cat", "dog", "bird", "horse", "rabbit", "fox", "wolf", "bear", "lion", "tiger", "leopard",
        "cheetah", "elephant", "giraffe", "zebra", "monkey", "gorilla", "panda", "koala", "kangaroo",
        "deer", "moose", "cow", "bull", "pig", "sheep", "goat", "donkey", "camel", "llama", "alpaca",
        "squirrel", "mouse", "rat", "hamster", "hedgehog", "raccoon", "otter", "beaver", "badger",
        "skunk", "bat", "owl", "eagle", "hawk", "parrot", "penguin", "flamingo", "swan", "duck",
        "goose", "chicken", "rooster", "turkey", "pigeon", "crow", "sparrow", "robin", "peacock",
        "seagull", "pelican", "frog", "toad", "turtle", "tortoise", "lizard", "snake", "crocodile",
        "alligator", "iguana", "chameleon", "fish", "goldfish", "shark", "whale", "dolphin", "seal",
        "walrus", "octopus", "squid", "jellyfish", "crab", "lobster", "shrimp", "starfish", "snail",
        "butterfly", "moth", "bee", "ant", "ladybug", "beetle", "spider", "dragonfly", "grasshopper",
        "puppy", "kitten", "lamb", "pony", "foal", "calf", "cub", "corgi", "poodle", "beagle",
        "dachshund", "husky", "terrier", "bulldog", "retriever", "chihuahua", "dragon", "unicorn",
        "dinosaur", "mammoth", "buffalo", "bison", "hippo", "rhino", "sloth", "lemur", "ferret",
        "mole", "weasel", "lynx", "jaguar", "puma", "hyena", "jackal", "coyote", "orca", "manatee",
        "stingray", "seahorse", "hummingbird", "woodpecker", "kingfisher", "heron", "stork", "crane",
    ),
    "toys": (
        "teddy", "ball", "robot", "doll", "puppet", "kite", "yoyo", "top", "marble", "block",
        "puzzle", "rattle", "balloon", "plushie", "figurine", "lego", "trainset", "dollhouse",
        "rocket", "drone", "frisbee", "skateboard", "scooter", "tricycle", "wagon", "pinwheel",
        "slinky", "dice", "domino", "chessboard", "pawn", "knight", "rook", "bishop", "queen",
        "king", "cards", "whistle", "drum", "xylophone", "boomerang", "sled", "snowman", "mascot",
    ),
    "furniture": (
        "chair", "table", "sofa", "lamp", "bed", "desk", "bench", "stool", "armchair", "couch",
        "bookshelf", "shelf", "cabinet", "cupboard", "dresser", "wardrobe", "drawer", "nightstand",
        "ottoman", "hammock", "crib", "cradle", "futon", "recliner", "sideboard", "bookcase",
        "mirror", "rug", "carpet", "curtain", "pillow", "cushion", "blanket", "quilt", "mattress",
        "clock", "chandelier", "lantern", "candle", "fireplace", "radiator", "fan", "heater",
        "doormat", "coatrack", "easel", "stepladder", "throne", "pedestal", "screen",
    ),
    "containers": (
        "cup", "mug", "vase", "bowl", "jar", "bottle", "glass", "teapot", "kettle", "pot", "pan",
        "bucket", "basket", "box", "crate", "barrel", "jug", "pitcher", "flask", "thermos",
        "canister", "tin", "can", "bag", "backpack", "suitcase", "purse", "wallet", "chest",
        "trunk", "urn", "goblet", "chalice", "teacup", "saucer", "plate", "tray", "tub", "pail",
        "carafe", "decanter", "ladle", "cauldron", "planter", "envelope", "parcel", "lunchbox",
        "toolbox", "birdcage", "aquarium",
    ),
    "plants": (
        "tree", "flower", "rose", "tulip", "daisy", "sunflower", "lily", "orchid", "lotus", "poppy",
        "lavender", "dandelion", "cactus", "fern", "moss", "ivy", "bamboo", "palm", "oak", "pine",
        "maple", "birch", "willow", "cedar", "bonsai", "succulent", "shrub", "bush", "hedge",
        "vine", "mushroom", "clover", "grass", "reed", "seaweed", "bouquet", "wreath", "leaf",
        "acorn", "pinecone", "blossom", "sapling", "hydrangea", "peony", "magnolia", "iris",
        "marigold", "carnation", "hibiscus", "thistle",
    ),
    "vehicles": (
        "car", "truck", "bus", "train", "tram", "bicycle", "motorcycle", "boat", "ship", "sailboat",
        "yacht", "canoe", "kayak", "submarine", "airplane", "helicopter", "jet", "glider", "blimp",
        "van", "jeep", "taxi", "ambulance", "firetruck", "tractor", "bulldozer", "excavator",
        "forklift", "limousine", "convertible", "minivan", "pickup", "trailer", "caravan",
        "carriage", "chariot", "locomotive", "ferry", "raft", "gondola", "spaceship", "satellite",
        "moped", "unicycle", "wheelchair", "stroller", "tank", "hovercraft", "zeppelin", "cart",
    ),
    "people": (
        "man", "woman", "boy", "girl", "child", "baby", "toddler", "teenager", "person", "people",
        "grandmother", "grandfather", "mother", "father", "sister", "brother", "friend", "family",
        "couple", "crowd", "chef", "doctor", "nurse", "teacher", "student", "farmer", "sailor",
        "pilot", "astronaut", "firefighter", "police", "soldier", "musician", "painter", "dancer",
        "singer", "athlete", "runner", "swimmer", "climber", "skier", "surfer", "cowboy", "pirate",
        "wizard", "witch", "princess", "prince", "clown", "magician", "scientist", "explorer",
        "fisherman", "gardener", "baker", "waiter", "monk", "ninja", "samurai", "viking",
        "superhero", "ghost", "zombie", "vampire", "elf", "fairy", "mermaid", "giant", "dwarf",
        "troll",
    ),
    "food": (
        "apple", "banana", "orange", "lemon", "lime", "cherry", "strawberry", "blueberry", "grape",
        "pear", "peach", "plum", "mango", "pineapple", "watermelon", "melon", "kiwi", "coconut",
        "avocado", "tomato", "potato", "carrot", "onion", "garlic", "pepper", "cucumber",
        "pumpkin", "broccoli", "corn", "lettuce", "cabbage", "eggplant", "bread", "baguette",
        "croissant", "bagel", "donut", "cake", "cupcake", "cookie", "muffin", "pie", "pancake",
        "waffle", "pizza", "burger", "sandwich", "hotdog", "taco", "burrito", "sushi", "noodles",
        "spaghetti", "salad", "soup", "rice", "egg", "cheese", "butter", "honey", "chocolate",
        "candy", "lollipop", "icecream", "popcorn", "pretzel", "coffee", "tea", "juice", "milk",
        "lemonade", "smoothie", "wine", "steak", "sausage", "dumpling", "macaron", "tart",
        "pudding", "jelly",
    ),
    "clothing": (
        "hat", "cap", "helmet", "crown", "scarf", "glove", "mitten", "shoe", "boot", "sneaker",
        "sandal", "sock", "shirt", "sweater", "hoodie", "jacket", "coat", "raincoat", "dress",
        "skirt", "jeans", "trousers", "shorts", "uniform", "costume", "apron", "tie", "bowtie",
        "belt", "necklace", "bracelet", "ring", "earring", "watch", "sunglasses", "spectacles",
        "umbrella", "mask", "cape", "cloak", "kimono", "tuxedo", "vest", "beret", "bandana",
        "backpacker",
    ),
    "household": (
        "book", "notebook", "pencil", "pen", "crayon", "paintbrush", "scissors", "ruler",
        "stapler", "globe", "map", "telescope", "microscope", "camera", "phone", "laptop",
        "computer", "keyboard", "monitor", "television", "radio", "headphones", "speaker",
        "microphone", "guitar", "violin", "cello", "piano", "trumpet", "saxophone", "flute",
        "harp", "accordion", "banjo", "ukulele", "spoon", "fork", "knife", "chopsticks", "whisk",
        "spatula", "toaster", "blender", "oven", "stove", "fridge", "sink", "faucet", "bathtub",
        "towel", "soap", "toothbrush", "comb", "brush", "broom", "mop", "vacuum", "iron", "hanger",
        "key", "lock", "padlock", "hammer", "wrench", "screwdriver", "saw", "axe", "shovel",
        "rake", "ladder", "rope", "chain", "wheel", "anchor", "compass", "hourglass", "candlestick",
        "trophy", "medal", "coin", "feather", "shell", "pebble", "rock", "crystal", "gem",
        "diamond", "statue", "sculpture", "painting", "poster", "photograph", "sign", "flag",
        "banner", "ticket", "letter", "gift", "present", "teddybear", "sword", "shield", "bow",
        "arrow", "spear", "wand", "potion", "scroll", "skull", "bone", "horseshoe", "mailbox",
        "birdhouse", "doghouse", "kennel", "fountain", "hydrant", "streetlight", "bell",
        "typewriter", "gramophone", "jukebox", "sewing", "thimble", "yarn", "button",
    ),
    "buildings": (
        "house", "cottage", "cabin", "hut", "barn", "castle", "palace", "tower", "lighthouse",
        "windmill", "church", "cathedral", "temple", "pagoda", "mosque", "skyscraper", "bridge",
        "tunnel", "gate", "door", "window", "fence", "wall", "staircase", "balcony", "chimney",
        "roof", "igloo", "tent", "treehouse", "greenhouse", "shed", "garage", "factory",
        "station", "airport", "stadium", "museum", "library", "school", "hospital", "shop",
        "cafe", "restaurant", "bakery", "market", "pyramid", "ruins", "arch", "dome",
    ),
    "nature": (
        "mountain", "hill", "volcano", "river", "lake", "waterfall", "ocean", "sea", "wave",
        "island", "cliff", "cave", "canyon", "valley", "glacier", "iceberg", "desert", "dune",
        "meadow", "field", "swamp", "pond", "stream", "cloud", "rainbow", "moon", "sun", "star",
        "planet", "comet", "galaxy", "nebula", "storm", "tornado", "lightning", "snowflake",
        "puddle", "boulder", "log", "stump", "nest", "web",
    ),
}

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "beige", "cyan", "magenta", "teal", "turquoise", "navy", "maroon", "crimson",
    "scarlet", "gold", "golden", "silver", "bronze", "copper", "ivory", "cream", "lavender",
    "violet", "indigo", "olive", "lime", "mint", "peach", "coral", "salmon", "amber", "emerald",
    "ruby", "sapphire", "tan", "khaki", "charcoal", "pastel", "neon", "rainbow", "multicolored",
)

MATERIALS: tuple[str, ...] = (
    "wooden", "metal", "metallic", "steel", "iron", "golden", "silver", "glass", "ceramic",
    "porcelain", "clay", "stone", "marble", "plastic", "rubber", "paper", "cardboard", "origami",
    "woolen", "knitted", "crocheted", "felt", "leather", "velvet", "silk", "cotton", "denim",
    "fluffy", "furry", "plush", "wicker", "bamboo", "concrete", "brick", "crystal", "icy",
    "chrome", "bronze", "copper", "jade", "wax", "lego", "pixelated", "holographic", "transparent",
)

SIZES: tuple[str, ...] = (
    "tiny", "small", "little", "miniature", "big", "large", "huge", "giant", "enormous",
    "massive", "tall", "short", "long", "wide", "narrow", "thin", "fat", "chubby", "round",
    "square", "oversized", "petite",
)

PATTERNS: tuple[str, ...] = (
    "striped", "spotted", "checkered", "plaid", "polka", "dotted", "floral", "paisley", "zigzag",
    "chevron", "marbled", "speckled", "patterned", "plain", "tartan", "camouflage", "geometric",
    "swirly", "glittery", "sparkly", "shiny", "matte", "glossy", "rusty", "dusty", "muddy",
    "wet", "old", "new", "vintage", "antique", "modern", "broken", "cracked", "cute", "fancy",
    "colorful", "happy", "sleepy", "angry", "curious", "playful", "smiling", "grumpy", "fierce",
    "friendly", "lonely", "elegant", "majestic", "tired",
)

SCENES: tuple[str, ...] = (
    "beach", "kitchen", "forest", "city street", "park", "garden", "living room", "bedroom",
    "bathroom", "office", "classroom", "library", "museum", "cafe", "restaurant", "market",
    "farm", "barn", "field", "meadow", "jungle", "desert", "mountain top", "snowy mountain",
    "lake shore", "riverbank", "waterfall", "cave", "canyon", "island", "harbor", "pier",
    "swimming pool", "playground", "stadium", "train station", "airport", "subway", "rooftop",
    "backyard", "porch", "attic", "basement", "garage", "workshop", "studio", "stage",
    "castle hall", "temple", "ruins", "underwater reef", "ocean", "space station", "outer space",
    "moon surface", "alien planet", "snowy village", "small town", "busy city", "alley",
    "bridge", "highway", "country road", "vineyard", "orchard", "greenhouse", "flower field",
    "autumn forest", "winter forest", "bamboo forest", "rainforest", "swamp", "savanna",
    "tundra", "volcano", "grocery store", "bookstore", "toy store", "bakery", "laboratory",
    "hospital", "school hallway", "dining room", "picnic blanket", "campsite", "treehouse",
    "wooden table", "kitchen counter", "windowsill", "bookshelf", "sofa", "bed", "desk",
)

STYLES: tuple[str, ...] = (
    "watercolor", "oil painting", "pencil sketch", "pixel art", "photo", "photograph",
    "charcoal drawing", "ink drawing", "pastel drawing", "acrylic painting", "digital painting",
    "concept art", "cartoon", "anime", "manga", "comic book", "children's book illustration",
    "storybook illustration", "vector art", "flat illustration", "low poly render", "cgi render",
    "clay model", "claymation", "stained glass", "mosaic", "woodcut", "linocut", "engraving",
    "etching", "embroidery", "needlepoint", "papercut", "collage", "graffiti", "mural", "fresco",
    "ukiyoe print", "impressionist painting", "expressionist painting", "cubist painting",
    "surrealist painting", "pop art", "art deco poster", "art nouveau poster", "vintage poster",
    "polaroid", "film photo", "black and white photo", "studio photo", "macro photo",
    "aerial photo", "snapshot", "selfie", "postcard", "blueprint", "technical drawing",
    "doodle", "crayon drawing", "chalk drawing", "sculpture", "figurine", "plush toy",
    "lego model", "origami model", "render", "illustration", "painting", "drawing", "sketch",
    "icon", "sticker", "emoji", "tattoo design", "logo",
)

RELATIONS: tuple[str, ...] = (
    "on", "on top of", "next to", "beside", "near", "left of", "right of", "to the left of",
    "to the right of", "under", "underneath", "below", "above", "over", "behind", "in front of",
    "inside", "in", "outside", "between", "among", "around", "against", "across from",
    "leaning on", "sitting on", "standing on", "lying on", "hiding behind", "peeking out of",
    "facing", "far from", "close to", "surrounded by", "holding", "wearing", "riding", "carrying",
    "chasing", "looking at", "playing with", "sleeping next to",
)

VERBS: tuple[str, ...] = (
    "sitting", "standing", "running", "walking", "jumping", "sleeping", "lying", "eating",
    "drinking", "playing", "flying", "swimming", "climbing", "dancing", "singing", "reading",
    "writing", "painting", "cooking", "baking", "smiling", "laughing", "crying", "yawning",
    "stretching", "hiding", "waiting", "resting", "floating", "falling", "rolling", "spinning",
    "glowing", "melting", "burning", "growing", "blooming", "shining", "sparkling", "dripping",
    "exploring", "fishing", "gardening", "skating", "skiing", "surfing", "riding", "driving",
    "sailing", "waving", "posing", "looking", "watching", "listening", "thinking", "dreaming",
    "wearing", "holding", "carrying", "pushing", "pulling", "chasing", "hugging",
)

LIGHTING: tuple[str, ...] = (
    "at night", "at dawn", "at dusk", "at sunset", "at sunrise", "at noon", "in the morning",
    "in the evening", "in the afternoon", "at midnight", "under moonlight", "in the rain",
    "in the snow", "in the fog", "in a storm", "on a sunny day", "on a cloudy day",
    "in autumn", "in winter", "in spring", "in summer", "by candlelight", "under neon lights",
    "in golden hour light", "with soft lighting", "with dramatic lighting", "with studio lighting",
    "with rim lighting", "backlit", "in harsh sunlight", "in dim light", "in the shade",
    "with long shadows", "under a starry sky", "under a full moon", "during a thunderstorm",
    "with bokeh", "with a blurry background", "with volumetric light", "in warm light",
    "in cold light", "in a dark room",
)

QUALITY: tuple[str, ...] = (
    "high quality", "detailed", "highly detailed", "sharp focus", "cinematic", "minimalist",
    "award winning", "trending", "beautiful", "realistic", "photorealistic", "stylized",
    "soft focus", "wide angle", "close up", "portrait", "full body", "centered", "symmetrical",
    "dreamy", "moody", "vibrant", "muted colors", "high contrast", "hd",
)

COUNTS: tuple[str, ...] = ("two", "three", "four", "five", "six", "several", "many", "a few", "a pair of", "a group of")

# Irregular plurals (everything else gets a rule-based plural in `plural`).
_IRREGULAR_PLURALS: dict[str, str] = {
    "mouse": "mice", "goose": "geese", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "moose": "moose", "bison": "bison", "buffalo": "buffaloes", "man": "men", "woman": "women",
    "child": "children", "person": "people", "people": "people", "knife": "knives",
    "leaf": "leaves", "wolf": "wolves", "shelf": "shelves", "elf": "elves", "dwarf": "dwarves",
    "cactus": "cacti", "scissors": "scissors", "chopsticks": "chopsticks", "headphones": "headphones",
    "jeans": "jeans", "trousers": "trousers", "shorts": "shorts", "sunglasses": "sunglasses",
    "spectacles": "spectacles", "noodles": "noodles", "dice": "dice", "cards": "cards",
    "ruins": "ruins", "police": "police", "family": "families", "potato": "potatoes",
    "tomato": "tomatoes", "hippo": "hippos", "rhino": "rhinos", "piano": "pianos",
    "photo": "photos", "mango": "mangoes", "volcano": "volcanoes", "tornado": "tornadoes",
    "domino": "dominoes", "calf": "calves", "loaf": "loaves", "octopus": "octopuses",
    "fisherman": "fishermen", "samurai": "samurai", "ninja": "ninjas", "moss": "moss",
    "grass": "grass", "rice": "rice", "corn": "corn", "honey": "honey", "milk": "milk",
    "tea": "tea", "coffee": "coffee", "juice": "juice", "butter": "butter", "cheese": "cheese",
    "chocolate": "chocolates", "crowd": "crowds", "couple": "couples", "yarn": "yarn",
    "sewing": "sewing", "seaweed": "seaweed", "wine": "wine", "soup": "soup",
}

_WORD = re.compile(r"^[a-z]+$")


def plural(noun: str) -> str:
    """English plural of a project noun (rule based, with an irregular table)."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def _unique(seq) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in seq:
        seen.setdefault(w, None)
    return tuple(seen)


# Every noun, in category order, each once. Any of them may be a superclass.
ALL_NOUNS: tuple[str, ...] = _unique(w for ws in NOUNS.values() for w in ws)
SUPERCLASS_WORDS: tuple[str, ...] = ALL_NOUNS
PLURALS: tuple[str, ...] = _unique(plural(w) for w in ALL_NOUNS)

# Short function words the caption templates use.
GLUE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "with", "and", "in", "on", "at", "by", "to", "from", "for", "its",
    "their", "his", "her", "my", "our", "this", "that", "is", "are", "some", "one", "very",
    "made", "style", "image", "picture", "photo", "view", "scene", "shot", "close", "up",
    "good", "nice", "bright", "dark", "clean", "rendering", "showing", "featuring", "group",
    "pair", "few",
)


def phrase_words(phrases) -> tuple[str, ...]:
    """The single words of multi-word phrases (split on spaces and apostrophes)."""
    return _unique(w for p in phrases for w in re.findall(r"[a-z0-9]+", p.lower()))


def all_words() -> tuple[str, ...]:
    """Every distinct word of the lists (nouns, plurals, adjectives, phrase words, glue words)."""
    return _unique(
        ALL_NOUNS
        + PLURALS
        + COLORS
        + MATERIALS
        + SIZES
        + PATTERNS
        + phrase_words(SCENES)
        + phrase_words(STYLES)
        + phrase_words(RELATIONS)
        + VERBS
        + phrase_words(LIGHTING)
        + phrase_words(QUALITY)
        + phrase_words(COUNTS)
        + GLUE_WORDS
    )


def _check() -> None:
    if len(ALL_NOUNS) != sum(len(ws) for ws in NOUNS.values()):
        raise AssertionError("a noun is listed in two categories")
    for w in ALL_NOUNS:
        if not _WORD.match(w):
            raise AssertionError(f"superclass word {w!r} must be one lowercase ASCII word")
    for w in all_words():
        if not re.match(r"^[a-z0-9]+$", w):
            raise AssertionError(f"word {w!r} is not plain lowercase ASCII")


_check()
