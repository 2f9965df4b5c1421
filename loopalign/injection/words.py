"""The published word lists of the concept-injection protocol (Lindsey et al. 2025).

50 concept words and 100 baseline words. The published baseline list has "Butterflies" twice; it
is kept as published (100 entries), so that word counts twice in the baseline mean
(``extract_concept_vectors(unique_baseline=True)`` drops the repeat).
"""

from __future__ import annotations

__all__ = ["CONCEPT_WORDS", "BASELINE_WORDS", "CONCEPT_TEMPLATE"]

CONCEPT_WORDS: tuple[str, ...] = tuple(
    "Dust Satellites Trumpets Origami Illusions Cameras Lightning Constellations Treasures Phones Trees "
    "Avalanches Mirrors Fountains Quarries Sadness Xylophones Secrecy Oceans Information Deserts Kaleidoscopes "
    "Sugar Vegetables Poetry Aquariums Bags Peace Caverns Memories Frosts Volcanoes Boulders Harmonies "
    "Masquerades Rubber Plastic Blood Amphitheaters Contraptions Youths Dynasties Snow Dirigibles Algorithms "
    "Denim Monoliths Milk Bread Silver".split()
)
BASELINE_WORDS: tuple[str, ...] = tuple(
    "Desks Jackets Gondolas Laughter Intelligence Bicycles Chairs Orchestras Sand Pottery Arrowheads Jewelry "
    "Daffodils Plateaus Estuaries Quilts Moments Bamboo Ravines Archives Hieroglyphs Stars Clay Fossils Wildlife "
    "Flour Traffic Bubbles Honey Geodes Magnets Ribbons Zigzags Puzzles Tornadoes Anthills Galaxies Poverty "
    "Diamonds Universes Vinegar Nebulae Knowledge Marble Fog Rivers Scrolls Silhouettes Marbles Cakes Valleys "
    "Whispers Pendulums Towers Tables Glaciers Whirlpools Jungles Wool Anger Ramparts Flowers Research Hammers "
    "Clouds Justice Dogs Butterflies Needles Fortresses Bonfires Skyscrapers Caravans Patience Bacon Velocities "
    "Smoke Electricity Sunsets Anchors Parchments Courage Statues Oxygen Time Butterflies Fabric Pasta Snowflakes "
    "Mountains Echoes Pianos Sanctuaries Abysses Air Dewdrops Gardens Literature Rice Enigmas".split()
)
#: The user turn whose last-token activation defines a word's concept vector.
CONCEPT_TEMPLATE = "Tell me about {word}"
