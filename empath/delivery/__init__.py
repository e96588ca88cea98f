"""empath.delivery"""
