"""The AI Studios API: the client for both generations, typed errors, and the local simulator."""
