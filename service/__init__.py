"""studiohook: business events in, AI Studios avatar videos out, each paid for exactly once."""
