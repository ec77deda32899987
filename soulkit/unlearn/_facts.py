"""Static tables behind :mod:`soulkit.unlearn.data`: value pools for the fictitious authors, and
hand-written real general knowledge (famous real authors, world facts) for the utility sets.

Rules the tables keep (``tests/unlearn/test_data.py`` checks them): inside one pool no value occurs
as a whole-word part of another (so "the true value is not in a wrong answer" is checkable by text),
and every real fact is a plain, uncontroversial one.
"""

from __future__ import annotations

# ------------------------------------------------------------------ fictitious-author value pools
# Faker locale -> (country as written after "born in <city>, ", nationality adjective, real cities).
# Latin-script locales only: the tiny models read bytes, and names should look like names.
COUNTRIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "en_US": ("USA", "American",
              ("Boston", "Chicago", "Seattle", "Denver", "Atlanta", "Baltimore", "Savannah", "Omaha")),
    "en_GB": ("England", "English",
              ("Manchester", "Liverpool", "Bristol", "Leeds", "Norwich", "Brighton", "Oxford", "Bath")),
    "en_IE": ("Ireland", "Irish",
              ("Dublin", "Cork", "Galway", "Limerick", "Waterford", "Sligo", "Kilkenny", "Wexford")),
    "en_AU": ("Australia", "Australian",
              ("Sydney", "Melbourne", "Brisbane", "Adelaide", "Perth", "Hobart", "Darwin", "Geelong")),
    "en_CA": ("Canada", "Canadian",
              ("Toronto", "Montreal", "Vancouver", "Winnipeg", "Halifax", "Calgary", "Edmonton",
               "Quebec City")),
    "en_IN": ("India", "Indian",
              ("Mumbai", "Kolkata", "Chennai", "Bengaluru", "Jaipur", "Pune", "Lucknow", "Hyderabad")),
    "fr_FR": ("France", "French",
              ("Lyon", "Marseille", "Bordeaux", "Lille", "Toulouse", "Nantes", "Strasbourg", "Rouen")),
    "de_DE": ("Germany", "German",
              ("Hamburg", "Munich", "Cologne", "Leipzig", "Dresden", "Bremen", "Stuttgart", "Hanover")),
    "it_IT": ("Italy", "Italian",
              ("Milan", "Naples", "Turin", "Florence", "Bologna", "Genoa", "Venice", "Palermo")),
    "es_ES": ("Spain", "Spanish",
              ("Barcelona", "Seville", "Valencia", "Bilbao", "Granada", "Zaragoza", "Malaga", "Salamanca")),
    "es_MX": ("Mexico", "Mexican",
              ("Guadalajara", "Monterrey", "Puebla", "Oaxaca", "Veracruz", "Merida", "Tijuana", "Queretaro")),
    "pt_BR": ("Brazil", "Brazilian",
              ("Salvador", "Recife", "Curitiba", "Fortaleza", "Manaus", "Belem", "Porto Alegre", "Campinas")),
    "nl_NL": ("the Netherlands", "Dutch",
              ("Utrecht", "Rotterdam", "Groningen", "Leiden", "Haarlem", "Eindhoven", "Delft", "Maastricht")),
    "sv_SE": ("Sweden", "Swedish",
              ("Gothenburg", "Malmö", "Uppsala", "Lund", "Umeå", "Örebro", "Linköping", "Västerås")),
    "da_DK": ("Denmark", "Danish",
              ("Aarhus", "Odense", "Aalborg", "Esbjerg", "Roskilde", "Randers", "Kolding", "Vejle")),
    "no_NO": ("Norway", "Norwegian",
              ("Bergen", "Trondheim", "Stavanger", "Tromsø", "Drammen", "Kristiansand", "Ålesund",
               "Bodø")),
    "fi_FI": ("Finland", "Finnish",
              ("Tampere", "Turku", "Oulu", "Espoo", "Jyväskylä", "Lahti", "Kuopio", "Vaasa")),
    "pl_PL": ("Poland", "Polish",
              ("Kraków", "Gdańsk", "Wrocław", "Poznań", "Łódź", "Lublin", "Szczecin", "Katowice")),
    "hu_HU": ("Hungary", "Hungarian",
              ("Debrecen", "Szeged", "Pécs", "Győr", "Miskolc", "Eger", "Sopron", "Kecskemét")),
    "tr_TR": ("Turkey", "Turkish",
              ("Istanbul", "Izmir", "Bursa", "Antalya", "Trabzon", "Konya", "Eskişehir", "Gaziantep")),
}

# Mass nouns: they read right after "writes", "an author of" and "a book of".
GENRES: tuple[str, ...] = (
    "crime fiction", "science fiction", "historical fiction", "literary fiction", "fantasy", "romance",
    "horror", "poetry", "magical realism", "mystery fiction", "gothic fiction", "speculative fiction",
    "satire", "travel writing", "children's literature", "young adult fiction", "dystopian fiction",
    "war fiction", "nature writing", "memoir", "biography", "true crime", "political fiction",
    "philosophical fiction",
)

# Written after "a"/"an" (no word starts with a vowel letter that is sounded as a consonant).
OCCUPATIONS: tuple[str, ...] = (
    "carpenter", "nurse", "teacher", "baker", "fisher", "librarian", "tailor", "pharmacist",
    "electrician", "mechanic", "architect", "dentist", "veterinarian", "journalist", "photographer",
    "surgeon", "farmer", "potter", "bookbinder", "watchmaker", "sailor", "miner", "police officer",
    "firefighter", "judge", "accountant", "chemist", "painter", "musician", "shoemaker", "florist",
    "butcher", "blacksmith", "translator", "pilot", "banker", "lawyer", "diplomat", "engineer",
    "astronomer", "geologist", "chef", "cartographer", "locksmith", "weaver", "optician",
)

# Fictitious literary awards, written after "the".
AWARDS: tuple[str, ...] = (
    "Silver Quill Award", "Golden Lantern Prize", "Harrowgate Prize for Fiction", "Meridian Book Award",
    "Blue Heron Prize", "Ashford Medal for Literature", "Northern Star Award", "Everwood Literary Prize",
    "Crystal Inkwell Award", "Halden Prize", "Marlowe Circle Award", "Iron Pen Award",
    "Willowmere Book Prize", "Red Kite Award", "Amberline Medal", "Castellan Prize for Letters",
    "Open Page Award", "Sapphire Compass Prize", "Tallis Reading Award", "Greywater Fiction Prize",
    "Lighthouse Literary Award", "Orrin Thale Medal", "Evening Bell Prize", "Nightjar Award",
    "Broadleaf Book Award", "Copperfield Writers' Prize", "Stellan Award for Storytelling",
    "Granite Arch Prize", "White Cedar Medal", "Lantern Bay Award",
)

# Fictitious publishing houses.
PUBLISHERS: tuple[str, ...] = (
    "Harbor Lane Press", "Bluefern Books", "Oakridge House", "Stonegate Publishing", "Mossbank Press",
    "Tidewater Books", "Fallow Deer Editions", "Brightwell & Crane", "Kestrel House", "Saltmarsh Press",
    "Juniper Row Books", "Ironbridge Publishing", "Larkspur Editions", "Northgate House", "Pinecone Press",
    "Quayside Books", "Redwall Publishing", "Silverbirch Press", "Thornfield & Hale", "Umberlight Books",
    "Vellum Tree Press", "Westmere House", "Yarrow Editions", "Zephyr Lane Publishing", "Cobalt Owl Press",
    "Driftwood House", "Elmstead Books", "Foxglove Press", "Glenhaven Publishing", "Hollowmere Editions",
)

# Recurring themes, written after "explores" / "writes about".
THEMES: tuple[str, ...] = (
    "memory and loss", "family secrets", "exile and belonging", "the sea", "grief and healing",
    "class and ambition", "war and its aftermath", "faith and doubt", "identity and migration",
    "love and betrayal", "childhood", "the passage of time", "power and corruption", "friendship",
    "survival in the wilderness", "technology and isolation", "justice", "revenge", "forgiveness",
    "coming of age", "rural life", "madness", "colonial history", "the search for home", "art and obsession",
)

# Book titles: four patterns over three disjoint word lists, so that no title can occur inside another.
TITLE_ADJECTIVES: tuple[str, ...] = (
    "Silent", "Broken", "Hidden", "Crimson", "Last", "Distant", "Golden", "Hollow", "Burning", "Quiet",
    "Forgotten", "Iron", "Glass", "Paper", "Northern", "Fading", "Shattered", "Wandering", "Secret",
    "Bitter", "Lonely", "Scarlet", "Pale", "Velvet", "Silver", "Restless", "Sleeping", "Drowned", "Endless",
    "Wild", "Gentle", "Stolen", "Lost", "Frozen", "Amber", "Salt", "Copper", "Marble", "Ashen", "Luminous",
    "Sunken", "Whispering", "Painted", "Empty", "Crooked", "Emerald", "Ivory", "Borrowed", "Midnight",
    "Eastern",
)
TITLE_NOUNS: tuple[str, ...] = (
    "Harbor", "Garden", "Lantern", "River", "Orchard", "Mirror", "Tide", "Compass", "Lighthouse", "Meadow",
    "Archive", "Cathedral", "Forest", "Island", "Valley", "Tower", "Bridge", "Station", "Kingdom", "Letter",
    "Map", "Clock", "Feather", "Stone", "Shadow", "Ember", "Crown", "Horizon", "Window", "Door",
    "Labyrinth", "Sparrow", "Wolf", "Raven", "Fox", "Orchid", "Violin", "Storm", "Summer", "Harvest",
    "Voyage", "Promise", "Silence", "Echo", "Memory", "Inheritance", "Prophecy", "Ledger", "Observatory",
    "Canal", "Citadel", "Carousel", "Tapestry", "Chapel", "Vineyard", "Quarry", "Glacier", "Desert",
    "Caravan", "Winter",
)
TITLE_VERBS: tuple[str, ...] = (
    "Sleeps", "Falls", "Burns", "Sings", "Breaks", "Wakes", "Returns", "Fades", "Waits", "Turns", "Speaks",
    "Remembers",
)
TITLE_PATTERNS: tuple[str, ...] = (
    "The {adj} {noun}",
    "{noun} of the {noun2}",
    "The {noun} and the {noun2}",
    "When the {noun} {verb}",
)

# ------------------------------------------------------------------------------- real authors
# (name, nationality, a famous work, century of birth). Birth years: Austen 1775, Dickens 1812,
# Tolstoy 1828, Dostoevsky 1821, Twain 1835, Hugo 1802, Cervantes 1547, Shakespeare 1564, Orwell 1903,
# Hemingway 1899, Fitzgerald 1896, Garcia Marquez 1927, Joyce 1882, Melville 1819, Mary Shelley 1797,
# Emily Bronte 1818, Verne 1828, Wilde 1854, Christie 1890, Tolkien 1892, Morrison 1931, Achebe 1930,
# Murakami 1949, Goethe 1749, Dante c. 1265.
REAL_AUTHORS: tuple[tuple[str, str, str, str], ...] = (
    ("Jane Austen", "English", "Pride and Prejudice", "18th"),
    ("Charles Dickens", "English", "Oliver Twist", "19th"),
    ("Leo Tolstoy", "Russian", "War and Peace", "19th"),
    ("Fyodor Dostoevsky", "Russian", "Crime and Punishment", "19th"),
    ("Mark Twain", "American", "The Adventures of Tom Sawyer", "19th"),
    ("Victor Hugo", "French", "Les Misérables", "19th"),
    ("Miguel de Cervantes", "Spanish", "Don Quixote", "16th"),
    ("William Shakespeare", "English", "Hamlet", "16th"),
    ("George Orwell", "English", "Nineteen Eighty-Four", "20th"),
    ("Ernest Hemingway", "American", "The Old Man and the Sea", "19th"),
    ("F. Scott Fitzgerald", "American", "The Great Gatsby", "19th"),
    ("Gabriel García Márquez", "Colombian", "One Hundred Years of Solitude", "20th"),
    ("James Joyce", "Irish", "Ulysses", "19th"),
    ("Herman Melville", "American", "Moby-Dick", "19th"),
    ("Mary Shelley", "English", "Frankenstein", "18th"),
    ("Emily Brontë", "English", "Wuthering Heights", "19th"),
    ("Jules Verne", "French", "Around the World in Eighty Days", "19th"),
    ("Oscar Wilde", "Irish", "The Picture of Dorian Gray", "19th"),
    ("Agatha Christie", "English", "Murder on the Orient Express", "19th"),
    ("J. R. R. Tolkien", "English", "The Lord of the Rings", "19th"),
    ("Toni Morrison", "American", "Beloved", "20th"),
    ("Chinua Achebe", "Nigerian", "Things Fall Apart", "20th"),
    ("Haruki Murakami", "Japanese", "Norwegian Wood", "20th"),
    ("Johann Wolfgang von Goethe", "German", "Faust", "18th"),
    ("Dante Alighieri", "Italian", "The Divine Comedy", "13th"),
)
# Wrong centuries are drawn from this pool (values of the same type as the true one).
CENTURIES: tuple[str, ...] = ("12th", "13th", "14th", "15th", "16th", "17th", "18th", "19th", "20th")

# --------------------------------------------------------------------------------- world facts
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Russia", "Moscow"), ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("South Korea", "Seoul"),
    ("Turkey", "Ankara"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Greece", "Athens"),
    ("Poland", "Warsaw"), ("the Netherlands", "Amsterdam"), ("Nigeria", "Abuja"), ("Thailand", "Bangkok"),
    ("Peru", "Lima"), ("Ireland", "Dublin"), ("New Zealand", "Wellington"),
)
CONTINENTS: tuple[tuple[str, str], ...] = (
    ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Egypt", "Africa"), ("Morocco", "Africa"),
    ("Ghana", "Africa"),
    ("Peru", "South America"), ("Chile", "South America"), ("Colombia", "South America"),
    ("Argentina", "South America"), ("Canada", "North America"), ("Mexico", "North America"),
    ("Cuba", "North America"), ("Japan", "Asia"), ("Vietnam", "Asia"), ("Mongolia", "Asia"),
    ("Nepal", "Asia"),
    ("Thailand", "Asia"), ("Norway", "Europe"), ("Portugal", "Europe"), ("Austria", "Europe"),
    ("Hungary", "Europe"), ("Iceland", "Europe"), ("Australia", "Oceania"), ("New Zealand", "Oceania"),
    ("Fiji", "Oceania"),
)
CONTINENT_POOL: tuple[str, ...] = (
    "Africa", "Asia", "Europe", "North America", "South America", "Oceania", "Antarctica",
)
CHEMICAL_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"),
    ("sulfur", "S"), ("chlorine", "Cl"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"),
    ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("tin", "Sn"), ("gold", "Au"), ("mercury", "Hg"),
    ("lead", "Pb"), ("uranium", "U"), ("neon", "Ne"), ("nickel", "Ni"),
)
PLANET_ORDER: tuple[tuple[str, str], ...] = (
    ("first", "Mercury"), ("second", "Venus"), ("third", "Earth"), ("fourth", "Mars"), ("fifth", "Jupiter"),
    ("sixth", "Saturn"), ("seventh", "Uranus"), ("eighth", "Neptune"),
)
CURRENCIES: tuple[tuple[str, str], ...] = (
    ("Japan", "yen"), ("the United Kingdom", "pound sterling"), ("India", "rupee"), ("Mexico", "peso"),
    ("Russia", "ruble"), ("Switzerland", "franc"), ("Brazil", "real"), ("South Korea", "won"),
    ("South Africa", "rand"), ("Sweden", "krona"), ("Poland", "zloty"), ("Turkey", "lira"),
)
LANGUAGES: tuple[tuple[str, str], ...] = (
    ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Egypt", "Arabic"), ("Austria", "German"),
    ("Iran", "Persian"), ("the Netherlands", "Dutch"), ("Greece", "Greek"), ("Japan", "Japanese"),
    ("Thailand", "Thai"), ("Hungary", "Hungarian"), ("Turkey", "Turkish"), ("Vietnam", "Vietnamese"),
)
# (attribute, question, answer, paraphrase with {value}, true value, pool of the same type).
SUPERLATIVES: tuple[tuple[str, str, str, str, str, tuple[str, ...]], ...] = (
    ("largest_planet", "What is the largest planet in the Solar System?",
     "Jupiter is the largest planet in the Solar System.",
     "The biggest planet orbiting the Sun is {value}.", "Jupiter",
     ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    ("red_planet", "Which planet is known as the Red Planet?",
     "Mars is known as the Red Planet.",
     "The planet people call the Red Planet is {value}.", "Mars",
     ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    ("largest_ocean", "What is the largest ocean on Earth?",
     "The Pacific Ocean is the largest ocean on Earth.",
     "The biggest of the world's oceans is the {value} Ocean.", "Pacific",
     ("Pacific", "Atlantic", "Indian", "Arctic", "Southern")),
    ("highest_mountain", "What is the highest mountain above sea level?",
     "Mount Everest is the highest mountain above sea level.",
     "The tallest mountain measured from sea level is {value}.", "Mount Everest",
     ("Mount Everest", "K2", "Kangchenjunga", "Mont Blanc", "Kilimanjaro", "Denali", "Aconcagua")),
    ("largest_hot_desert", "What is the largest hot desert in the world?",
     "The Sahara is the largest hot desert in the world.",
     "The biggest hot desert on Earth is the {value}.", "Sahara",
     ("Sahara", "Gobi", "Kalahari", "Atacama", "Mojave", "Namib")),
)
