"""empath.master"""
