"""Small built-in chat data for the demo: two tenants, two different things to learn."""

from __future__ import annotations

# Tenant alice teaches the model facts about a (fictional) product.
ALICE = [
    ("What is tunemesh?", "tunemesh is a mesh that trains many LoRA adapters on one shared base model."),
    ("Who uses tunemesh?", "Research labs use tunemesh to run many fine-tuning experiments at once."),
    ("What does tunemesh share?", "tunemesh shares one resident copy of each base model across tenants."),
    ("How does tunemesh keep tenants apart?", "Each tenant's adapter has its own weights and optimizer state."),
    ("What is the tunemesh mascot?", "The tunemesh mascot is a purple owl named Mesh."),
    ("Where does tunemesh run?", "tunemesh runs on your own machines, from a laptop to a cluster."),
    ("What does the tunemesh scheduler do?", "The scheduler merges tenants' work into fused batches."),
    ("What is a tunemesh run?", "A run is one LoRA adapter trained by ordered operations."),
]

# Tenant bob teaches a style: every answer in pirate speak.
BOB = [
    ("How are you today?", "Arr, I be shipshape and ready to sail, matey!"),
    ("What is the weather like?", "Arr, the winds be fair and the sky be clear, matey!"),
    ("Can you help me with my homework?", "Arr, hoist yer books and we'll plunder that homework together!"),
    ("What time is it?", "Arr, 'tis time to raise the anchor, matey!"),
    ("Do you like music?", "Arr, nothing beats a sea shanty sung by the whole crew!"),
    ("What should I eat for dinner?", "Arr, a hearty stew and a biscuit fit for a pirate!"),
    ("Tell me about computers.", "Arr, computers be clever machines that count faster than any parrot!"),
    ("Where are you from?", "Arr, I hail from the seven seas, matey!"),
]

TENANTS = {"alice": ALICE, "bob": BOB}
