"""Built-in English prose for the reproduction runs and the budget command.

Original text written for certattn (public domain / CC0): neutral, varied paragraphs so
that attention sees ordinary language (narration, description, explanation, lists,
numbers, dialogue).  About 1,400 SmolLM2 tokens in all; each paragraph fits MiniLM's
512-position window.
"""

from __future__ import annotations

__all__ = ["PARAGRAPHS", "corpus_text"]

PARAGRAPHS: tuple[str, ...] = (
    "The river town woke slowly on market days. By six in the morning the first carts had "
    "crossed the stone bridge, loaded with cabbages, crates of apples and sacks of flour from "
    "the mill upstream. The baker opened her shutters and set out trays of bread that were "
    "still too hot to touch, and the smell drifted down the lane to the square, where the "
    "stallholders argued cheerfully about the best places under the chestnut trees. Children "
    "ran between the tables, and an old man with a folding chair claimed the same corner he "
    "had claimed for thirty years, from which he sold honey, beeswax candles and advice.",
    "A suspension bridge carries its deck on vertical hangers that hang from two main cables. "
    "The cables pass over tall towers and are anchored in massive blocks of concrete at each "
    "end, so that most of the load travels along the cables as tension and reaches the "
    "ground through the anchorages. Engineers worry less about the weight of traffic than "
    "about wind: a long, light deck can twist or oscillate if gusts arrive at the wrong "
    "rhythm. Modern decks are therefore shaped like the wing of an aircraft turned upside "
    "down, and they are tested as scale models in wind tunnels before construction begins.",
    "To make a simple vegetable soup, start by warming a spoonful of oil in a heavy pot. Add "
    "a chopped onion, two carrots and a stick of celery, and let them soften over a low heat "
    "for about ten minutes without letting them brown. Pour in a litre of stock, add a "
    "handful of lentils and a bay leaf, and simmer until the lentils are tender, which "
    "usually takes twenty to twenty-five minutes. Season with salt and pepper at the end, "
    "because the stock may already be salty. A squeeze of lemon juice just before serving "
    "makes the flavours brighter.",
    "Early mapmakers worked from the reports of sailors, merchants and soldiers, and their "
    "charts mixed careful measurement with rumour. Coastlines that had been sailed many times "
    "were drawn with surprising accuracy, while the interiors of continents were often left "
    "blank or filled with decorative mountains and rivers that nobody had seen. The "
    "invention of reliable clocks that kept time at sea changed everything: a navigator who "
    "knew the time at the home port could compare it with local noon and work out the "
    "longitude, and within a century the outlines of the oceans were largely settled.",
    "On a clear night far from city lights, the band of the Milky Way is visible as a pale, "
    "uneven river across the sky. It is the combined glow of billions of stars in the disc "
    "of our galaxy, seen edge on from inside. Dark patches within it are not gaps but clouds "
    "of dust that block the light behind them. With a pair of ordinary binoculars an "
    "observer can pick out star clusters, the four bright moons of Jupiter and the craters "
    "along the boundary between light and shadow on the Moon, where the low sun casts long "
    "shadows across the surface.",
    "Gardeners who want vegetables through the autumn usually sow a second round of seeds in "
    "midsummer. Quick crops such as radishes, spinach and lettuce can follow early potatoes "
    "or peas in the same bed. The soil should be watered the evening before sowing, and the "
    "young plants need shade during the hottest afternoons. Many growers keep a notebook "
    "with the date of each sowing, the variety and the first harvest, and after a few years "
    "the notebook becomes more useful than any catalogue, because it records what actually "
    "works in their own garden.",
    '"Are you sure this is the right platform?" asked Mara, looking at the departure board. '
    '"It says the train to the coast leaves from platform four, but there is nobody here." '
    'Her brother shrugged and pointed at the small sign by the stairs. "They changed it this '
    'morning. The announcement said platform seven, and the train is already ten minutes '
    'late." They picked up their bags and hurried along the corridor, past a kiosk selling '
    "newspapers and a group of students sitting on their suitcases, and arrived just as the "
    "doors began to close.",
    "A spreadsheet is a grid of cells arranged in rows and columns, where each cell can hold "
    "a number, a piece of text or a formula. A formula refers to other cells by their "
    "addresses, so that changing one value updates every result that depends on it. This "
    "simple idea made spreadsheets one of the first programs that ordinary offices bought "
    "computers for. Budgets, timetables, stock lists and school grades all fit naturally into "
    "a table, and a chart can be drawn from any range of cells with a few clicks.",
    "Bees communicate the location of flowers through a movement often called the waggle "
    "dance. A forager returning to the hive runs in a straight line while shaking her body, "
    "then loops back and repeats the run. The angle of the run relative to vertical tells "
    "the other bees the direction of the food relative to the sun, and the length of the "
    "waggle phase tells them the distance. Because the sun moves during the day, the "
    "dancers adjust the angle over time, so the message stays correct for hours.",
    "In the mountains the weather can change within minutes. Walkers are advised to carry a "
    "waterproof jacket, a warm layer, a map and a compass even on a sunny morning, and to "
    "tell someone where they are going and when they expect to return. Clouds that build "
    "quickly over the peaks in the early afternoon often bring thunderstorms, and the safest "
    "plan is to be off the exposed ridges before they arrive. Streams that are easy to cross "
    "in the morning may be fast and deep by evening after heavy rain higher up.",
    "The library on the corner of the square was built in 1908 with money raised by the "
    "townspeople, and its reading room still has the original oak tables and green lamps. "
    "Over the years it added a children's section, a collection of local newspapers going "
    "back to 1850, and a row of computers near the entrance. On Saturday mornings a "
    "volunteer reads stories aloud to a circle of small children on cushions, while their "
    "parents browse the shelves of new arrivals or sit by the tall windows with a book.",
    "Glass is made by heating sand, soda ash and limestone until they melt together into a "
    "thick, glowing liquid. As it cools, the liquid becomes stiffer and stiffer without ever "
    "forming the regular crystals of most solids, which is why glass is clear. Glassblowers "
    "gather a ball of molten glass on the end of a long pipe and shape it by blowing, "
    "turning and rolling it on a flat steel table. Finished pieces are cooled slowly in a "
    "warm oven overnight, because glass that cools too fast can crack from internal stress.",
)


def corpus_text(paragraphs: tuple[str, ...] = PARAGRAPHS) -> str:
    """The built-in paragraphs joined by blank lines."""
    return "\n\n".join(paragraphs)
