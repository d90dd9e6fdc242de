"""Transports: how rows reach the rank that holds their expert. Only the exchange's factory imports them."""
