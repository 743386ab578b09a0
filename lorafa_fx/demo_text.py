"""The English text ``python -m lorafa_fx demo --model smollm2`` fine-tunes on.

Written for this project (no copyright is claimed; use it freely): a short story the pretrained
model has never seen, so what it recites after training is what LoRA-FA taught it.
"""

TITLE = "The Keeper of Carrow Point"

TEXT = """\
The lighthouse at Carrow Point was kept by a woman named Ada Wren, who had come to the island \
as a girl of nine and never once wished to leave it. Every evening at dusk she climbed the \
hundred and twelve steps of the tower, trimmed the wick, polished the great lens with a cloth of \
soft grey wool, and lit the lamp that ships could see from twenty miles out at sea.

The island was small and bare. A few sheep grazed on the thin grass near the cliffs, and a \
garden of cabbages and beans grew behind a stone wall that kept off the worst of the wind. Once \
a month a boat came from the harbour at Penmoor with flour, oil for the lamp, and a bundle of \
letters tied with string. Ada read the letters slowly, one each night, so that they would last \
until the boat came again.

In the winter of the great storm the boat did not come for eleven weeks. The oil ran low, and \
Ada began to burn the lamp for only half the night, from dusk until the tide turned. She wrote \
in her logbook that the sea had taken the landing stage, two of the sheep and most of the \
garden wall, but that the light had not failed, not even for an hour.

On the first calm morning in March she saw a sail on the horizon. It was not the Penmoor boat \
but a fishing smack from the north, blown far off its course, with a broken mast and four tired \
men aboard. They told her they had steered by her light for three nights, when the stars were \
hidden and the compass could not be trusted. Ada gave them bread, hot tea and the last of the \
dried apples, and they mended their mast on the shingle below the tower.

When at last the Penmoor boat returned, it carried a new lens, a barrel of oil and a letter \
from the lighthouse board thanking the keeper of Carrow Point for her service. Ada read it \
once, folded it into her logbook, and climbed the hundred and twelve steps to light the lamp, \
because the sun was going down and there were ships at sea.
"""

#: The start of the story: the demo prompts with it before and after training.
PROMPT = "The lighthouse at Carrow Point was kept by"
